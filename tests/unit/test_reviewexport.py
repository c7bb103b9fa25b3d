"""`steeldefect review export`: reviewed images from the service's audit database into class folders
that `train` reads, with a manifest; never overwriting, deduplicating by sha256, resuming, and one
line for each bad input. The database and store are written here as the contract lays them out."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pytest

from review_db import ReviewDB
from steeldefect import cli
from steeldefect.data import reviewexport
from steeldefect.data.dataset import scan_dataset
from steeldefect.data.reviewexport import MANIFEST_COLUMNS, export_reviews


@pytest.fixture
def reviews(tmp_path, make_image):
    """Eight stored images, none decided yet."""
    db = ReviewDB(tmp_path / "audit.sqlite", tmp_path / "store")
    shas = [db.store_image(make_image(tmp_path / "line" / f"strip{i}.jpg", seed=i)) for i in range(8)]
    return db, shas


def manifest(out: Path) -> list[dict[str, str]]:
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_latest_decision_wins_and_the_folder_is_a_training_dataset(reviews, tmp_path):
    db, shas = reviews
    for sha in shas[:4]:
        db.decide(sha, "crazing")
    for sha in shas[4:]:
        db.decide(sha, "patches", model_class="patches", probability=0.97)
    db.decide(shas[0], "inclusion", reviewer="bo", note="dark spots")  # a second inspector, later
    out = tmp_path / "reviewed"
    result = export_reviews(db.db, out)
    assert (result.copied, result.already, result.problems) == (8, 0, [])
    assert result.classes == {"crazing": 3, "inclusion": 1, "patches": 4}
    assert (out / "inclusion" / f"{shas[0]}.jpg").read_bytes() == (db.store / f"{shas[0]}.jpg").read_bytes()
    assert not (out / "crazing" / f"{shas[0]}.jpg").exists()
    rows = {row["sha256"]: row for row in manifest(out)}
    assert list(manifest(out)[0]) == list(MANIFEST_COLUMNS)
    assert rows[shas[0]]["reviewer"] == "bo" and rows[shas[0]]["note"] == "dark spots"
    assert rows[shas[0]]["decided_class"] == "inclusion" and rows[shas[0]]["file"] == f"inclusion/{shas[0]}.jpg"
    assert rows[shas[5]]["model_class"] == "patches" and float(rows[shas[5]]["model_probability"]) == 0.97
    assert rows[shas[0]]["first_seen"].startswith("2026-12-02T10:00")
    dataset = scan_dataset(out)  # what `train --data reviewed` sees; manifest.csv is ignored
    assert dataset.class_names == ("crazing", "inclusion", "patches")
    assert dataset.counts() == {"crazing": 3, "inclusion": 1, "patches": 4}


def test_a_rerun_copies_nothing_and_a_changed_decision_moves_the_image(reviews, tmp_path):
    db, shas = reviews
    db.decide(shas[0], "scratches")
    for sha in shas[1:]:
        db.decide(sha, "crazing")
    out = tmp_path / "reviewed"
    export_reviews(db.db, out)
    again = export_reviews(db.db, out)
    assert (again.copied, again.already, again.moved) == (0, 8, 0)
    db.decide(shas[0], "crazing", reviewer="bo")
    moved = export_reviews(db.db, out)
    assert (moved.copied, moved.already, moved.moved) == (0, 7, 1)
    assert (out / "crazing" / f"{shas[0]}.jpg").is_file()
    assert not (out / "scratches").exists()  # an emptied class folder would make train refuse the data
    assert len(manifest(out)) == 8


def test_never_overwrites_a_file_it_did_not_export(reviews, tmp_path, make_image):
    db, shas = reviews
    for sha in shas:
        db.decide(sha, "crazing")
    out = tmp_path / "reviewed"
    squatter = make_image(out / "crazing" / f"{shas[3]}.jpg", seed=99)
    before = squatter.read_bytes()
    result = export_reviews(db.db, out)
    assert squatter.read_bytes() == before
    assert result.copied == 7 and len(result.problems) == 1
    assert "not overwritten" in result.problems[0] and shas[3] in result.problems[0]


def test_a_new_kind_waits_hidden_until_it_has_the_minimum(reviews, tmp_path, capsys):
    db, shas = reviews
    for sha in shas[:4]:
        db.decide(sha, "crazing")
    for sha in shas[4:7]:
        db.decide(sha, "oil spot", new_kind=True)
    out = tmp_path / "reviewed"
    code = cli.main(["review", "export", "--db", str(db.db), "--out", str(out), "--min-images", "4"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert f"waiting: oil spot (3 of 4 images; in {out / '.waiting' / 'oil spot'})" in stdout
    assert len(list((out / ".waiting" / "oil spot").iterdir())) == 3
    assert {row["status"] for row in manifest(out) if row["decided_class"] == "oil spot"} == {"waiting"}
    with pytest.raises(Exception, match="only one class folder"):
        scan_dataset(out)  # the waiting kind is not a class train sees
    db.decide(shas[7], "oil spot", new_kind=True)
    result = export_reviews(db.db, out, min_images=4)
    assert result.waiting == {} and result.classes == {"crazing": 4, "oil spot": 4}
    assert (result.copied, result.moved) == (1, 3)
    assert scan_dataset(out).counts() == {"crazing": 4, "oil spot": 4}
    assert not (out / ".waiting" / "oil spot").exists()
    assert {row["status"] for row in manifest(out)} == {"exported"}


def test_the_default_minimum_is_what_train_needs_per_class(tmp_path, make_neu_dataset):
    """7 with train's defaults (15% test, 5 folds): the class check train's load_data applies."""
    from steeldefect.core.options import DataOptions
    from steeldefect.data.splits import minimum_class_size

    minimum = reviewexport.default_min_images()
    options = DataOptions()
    assert minimum == minimum_class_size(options.test_fraction, options.n_folds) == 7
    enough = make_neu_dataset(tmp_path / "enough", per_class=minimum, classes=("crazing", "oil"), layout="folders")
    scan_dataset(enough, min_per_class=minimum)
    short = make_neu_dataset(tmp_path / "short", per_class=minimum - 1, classes=("crazing", "oil"), layout="folders")
    with pytest.raises(Exception, match=f"at least {minimum} are needed"):
        scan_dataset(short, min_per_class=minimum)


def test_an_interrupted_export_resumes_without_loss_or_leftovers(reviews, tmp_path, monkeypatch):
    db, shas = reviews
    for sha in shas:
        db.decide(sha, "crazing")
    out = tmp_path / "reviewed"
    real_decode, calls = reviewexport.decode_file, []

    def interrupted(path):
        calls.append(path)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of the fourth copy
        return real_decode(path)

    monkeypatch.setattr(reviewexport, "decode_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_reviews(db.db, out)
    assert len(list((out / "crazing").glob("*.jpg"))) == 3
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.csv").exists()
    monkeypatch.setattr(reviewexport, "decode_file", real_decode)
    result = export_reviews(db.db, out)
    assert (result.copied, result.already) == (5, 3)
    assert sorted(p.stem for p in (out / "crazing").iterdir()) == sorted(shas)
    assert len(manifest(out)) == 8


def test_bad_images_are_left_out_one_line_each_and_the_rest_exported(reviews, tmp_path, capsys):
    db, shas = reviews
    for sha in shas:
        db.decide(sha, "crazing")
    (db.store / f"{shas[1]}.jpg").unlink()  # evicted from the store
    corrupt = b"\xff\xd8\xff not really a jpeg"
    import hashlib

    corrupt_sha = hashlib.sha256(corrupt).hexdigest()
    (db.store / f"{corrupt_sha}.jpg").write_bytes(corrupt)
    (db.store / f"{shas[2]}.jpg").write_bytes(b"changed on disk")
    with sqlite3.connect(db.db) as connection:
        connection.execute(
            "INSERT INTO review_queue (image_sha256, file, bytes, reason, first_seen) VALUES (?, ?, 10, 'uncertain', "
            "'2026-12-02T11:00:00Z')",
            (corrupt_sha, f"{corrupt_sha}.jpg"),
        )
    connection.close()
    db.decide(corrupt_sha, "crazing")
    db.decide(shas[3], "../../etc")
    out = tmp_path / "reviewed"
    code = cli.main(["review", "export", "--db", str(db.db), "--out", str(out)])
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert code == 1 and len(errors) == 4, captured.err
    assert any(f"{shas[1]}.jpg: reviewed image no longer in the review store" in line for line in errors)
    assert any(f"{corrupt_sha}.jpg: corrupt JPEG data" in line for line in errors)
    assert any(f"{shas[2]}.jpg: stored bytes have sha256" in line for line in errors)
    assert any("'../../etc' cannot be a class folder name" in line for line in errors)
    assert "Traceback" not in captured.err
    assert sorted(p.stem for p in (out / "crazing").iterdir()) == sorted(shas[i] for i in (0, 4, 5, 6, 7))
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("case", ["missing db", "no review tables", "not sqlite", "unknown store", "no store named"])
def test_a_bad_start_is_one_line_and_writes_nothing(tmp_path, capsys, case):
    db_path, out = tmp_path / "audit.sqlite", tmp_path / "reviewed"
    args = ["review", "export", "--db", str(db_path), "--out", str(out)]
    if case == "no review tables":
        with sqlite3.connect(db_path) as connection:
            connection.execute("CREATE TABLE predictions (id INTEGER PRIMARY KEY)")
        connection.close()
        expected = "no review tables (review_queue, review_decisions missing)"
    elif case == "not sqlite":
        db_path.write_text("hello, I am a text file and not a database at all " * 20)
        expected = "not an SQLite database"
    elif case == "unknown store":
        ReviewDB(db_path, tmp_path / "store")
        args += ["--images", str(tmp_path / "nowhere")]
        expected = f"{tmp_path / 'nowhere'}: review store folder not found"
    elif case == "no store named":
        ReviewDB(db_path, tmp_path / "store", name_store=False)
        expected = "names no review store (review_meta.store_dir); give --images"
    else:
        expected = f"{db_path}: audit database not found"
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_exports_what_the_services_review_store_wrote(tmp_path, make_image):
    """The contract from the other side: the service's own ReviewStore keeps the images and records
    the decisions (with an audit database as `serve --audit` makes it), then the export reads them."""
    import hashlib

    from steeldefect.serve.audit import AuditLog
    from steeldefect.serve.review import ReviewStore

    db_path = tmp_path / "audit.sqlite"
    AuditLog(db_path).close()  # the predictions table, as the service creates it
    store = ReviewStore(tmp_path / "store", db_path, sample=0.0)
    classes = ("crazing", "patches")
    shas = []
    for i in range(9):
        data = make_image(tmp_path / "line" / f"strip{i}.png", seed=i).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        assert store.keep(data, sha, "uncertain") is not None
        shas.append(sha)
    for i, sha in enumerate(shas):
        if i < 2:
            body = {"reviewer": "ana", "decided_class": "crazing"}
        else:
            body = {"reviewer": "ana", "decided_class": "oil_spot", "new_kind": True, "note": f"strip {i}"}
        store.decide(sha, {**body, "idempotency_key": f"k{i}"}, classes)
        store.decide(sha, {**body, "idempotency_key": f"k{i}"}, classes)  # a retry: still one decision
    store.decide(shas[1], {"reviewer": "bo", "decided_class": "patches"}, classes)  # later, another inspector
    store.close()
    out = tmp_path / "reviewed"
    result = export_reviews(db_path, out)  # the store folder comes from review_meta
    assert result.problems == [] and result.classes == {"crazing": 1, "patches": 1, "oil_spot": 7}
    rows = {row["sha256"]: row for row in manifest(out)}
    assert rows[shas[1]]["reviewer"] == "bo" and rows[shas[1]]["decided_class"] == "patches"
    assert rows[shas[5]]["new_kind"] == "1" and rows[shas[5]]["note"] == "strip 5"
    assert rows[shas[5]]["model_class"] == "unknown"  # no audit row was written for these images
    assert scan_dataset(out).counts() == {"crazing": 1, "oil_spot": 7, "patches": 1}
