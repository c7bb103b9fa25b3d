from steeldefect.cli import main

raise SystemExit(main())
