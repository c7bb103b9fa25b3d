"""Shared services below every stage: atomic files and the cache, the CPU description, metrics,
every command's options and the run folder's layout. Imports nothing else of steeldefect."""
