"""The completion contract: every stage's _COMPLETE.json holds its config and the hashes of its inputs;
select has its own directory and marker; evaluate records the keep-list it uses; an output made from
other inputs, or by an older histodiffusion, is refused with a clear error (select and report re-made)."""
import json
import shutil

import pytest
from helpers_eval import make_class_samples, make_dataset, one_thread

from histodiffusion.cli import main
from histodiffusion.runtime.contract import check_complete, fingerprint
from histodiffusion.runtime.errors import HistoError
from histodiffusion.runtime.registry import build

SELECT = ["--subset", "train", "--backbone", "small_cnn_w8", "--feature-steps", "5", "--generative-metrics", "false"]
EVALUATE = ["--subset", "frac0.5", "--arms", "real,selected", "--ratios", "0.25", "--seeds", "0",
            "--backbone", "small_cnn_w8", "--steps", "2", "--val-every", "0", "--batch-size", "8"]


@pytest.fixture
def chain(tmp_path):
    data = make_dataset(tmp_path / "data")
    samples = make_class_samples(tmp_path / "samples", n_per_class=6)
    return data, samples


def _select(data, samples, *extra) -> int:
    return main(["select", "--samples", str(samples), "--data", str(data), *SELECT, *extra])


def _evaluate(data, samples, out, *extra) -> int:
    return main(["evaluate", "--data", str(data), "--samples", str(samples), "--out", str(out), *EVALUATE, *extra])


def test_select_has_its_own_directory_and_marker(chain, capsys):
    data, samples = chain
    with one_thread():
        assert _select(data, samples) == 0
    sel = samples / "select"
    marker = json.loads((sel / "_COMPLETE.json").read_text())
    assert (sel / "config.json").is_file() and (sel / "filtered.csv").is_file()
    assert marker["format_version"] == 2 and marker["config"]["samples"] == str(samples)
    assert marker["inputs"] == {"samples": fingerprint(samples), "data": fingerprint(data)}
    assert not (samples / "filtered.csv").exists()  # nothing written into the sample stage's directory
    cfg = build("select", {"samples": str(samples), "data": str(data), "subset": "train", "backbone": "small_cnn_w8",
                           "feature_steps": 5, "generative_metrics": False})
    assert check_complete(sel, cfg)
    # a kill between filtered.csv and the marker: not complete, and evaluate refuses it
    (sel / "_COMPLETE.json").unlink()
    assert not check_complete(sel, cfg)
    with one_thread():
        assert _evaluate(data, samples, samples.parent / "e") == 2
    assert "is incomplete (no _COMPLETE.json: select was interrupted)" in capsys.readouterr().err
    # a sample directory of the older layout (filtered.csv beside samples.csv): a clear error
    old = samples.parent / "old"
    shutil.copytree(samples, old)
    shutil.move(old / "select" / "filtered.csv", old / "filtered.csv")
    shutil.rmtree(old / "select")
    with one_thread():
        assert _evaluate(data, old, samples.parent / "e_old") == 2
    assert "written by an older histodiffusion (format 1" in capsys.readouterr().err


def test_evaluate_records_the_keep_list_and_refuses_another(chain, tmp_path, capsys):
    data, samples = chain
    out = tmp_path / "eval"
    with one_thread():
        assert _select(data, samples) == 0
        assert _evaluate(data, samples, out) == 0
    keep = json.loads((out / "keep_list.json").read_text())
    assert keep["filtered_csv"] == str((samples / "select" / "filtered.csv").resolve())
    marker = json.loads((out / "_COMPLETE.json").read_text())
    assert set(marker["inputs"]) == {"data", "samples", "selection"}
    # select again with other filters: re-made in its own directory (another keep-list)
    before = (samples / "select" / "filtered.csv").read_bytes()
    with one_thread():
        assert _select(data, samples, "--min-confidence", "0", "--require-nearest-centroid", "false") == 0
        assert (samples / "select" / "filtered.csv").read_bytes() != before
        # the finished evaluation was made from the old selection: the same command is refused, naming it
        assert _evaluate(data, samples, out) == 2
    err = capsys.readouterr().err
    assert "is complete but was made from other inputs: selection changed" in err
    # an interrupted evaluation resumed on a new keep-list is refused too (classifiers never mix)
    (out / "_COMPLETE.json").unlink()
    with one_thread():
        assert _evaluate(data, samples, out) == 2
    assert "was started with another keep-list" in capsys.readouterr().err


def test_marker_of_an_older_histodiffusion_is_refused(chain, tmp_path):
    data, samples = chain
    with one_thread():
        assert _select(data, samples) == 0
    sel = samples / "select"
    marker = json.loads((sel / "_COMPLETE.json").read_text())
    (sel / "_COMPLETE.json").write_text(json.dumps({"format_version": 1, "finished": marker["finished"]}))
    cfg = build("select", {"samples": str(samples), "data": str(data)})
    with pytest.raises(HistoError, match="completed by an older histodiffusion .*format 1"):
        check_complete(sel, cfg)


def test_fingerprint_follows_the_stage_that_made_an_input(tmp_path):
    from histodiffusion.runtime.rundirs import mark_complete

    stage = tmp_path / "ldm"
    (stage / "model" / "unet_ema").mkdir(parents=True)
    assert fingerprint(stage / "model" / "unet_ema") == "missing"  # not made yet
    mark_complete(stage, steps=10)
    a = fingerprint(stage / "model" / "unet_ema")
    assert a != fingerprint(stage / "model") and a == fingerprint(stage / "model" / "unet_ema")
    (stage / "model" / "scheduler").mkdir()
    (stage / "model" / "scheduler" / "scheduler_config.json").write_text('{"beta_end": 0.0155}')
    sched = fingerprint(stage / "model" / "scheduler")
    mark_complete(stage, steps=20)  # trained longer: the weights inside it have another hash ...
    assert fingerprint(stage / "model" / "unet_ema") != a
    assert fingerprint(stage / "model" / "scheduler") == sched  # ... its noise schedule (config files only) not
    (stage / "model" / "scheduler" / "scheduler_config.json").write_text('{"beta_end": 0.02}')
    assert fingerprint(stage / "model" / "scheduler") != sched


def test_a_copied_output_with_its_inputs_is_still_complete(chain, tmp_path):
    """Inputs are compared by hash, not by path: finished stages of a copied run directory are reused."""
    data, samples = chain
    with one_thread():
        assert _select(data, samples) == 0
    fields = {"subset": "train", "backbone": "small_cnn_w8", "feature_steps": 5, "generative_metrics": False}
    copy = tmp_path / "copy"
    shutil.copytree(data, copy / "data")
    shutil.copytree(samples, copy / "samples")
    moved = build("select", {"samples": str(copy / "samples"), "data": str(copy / "data"), **fields})
    assert check_complete(copy / "samples" / "select", moved)
    # another setting is still another config, wherever the inputs are
    assert not check_complete(copy / "samples" / "select", build("select", {
        "samples": str(copy / "samples"), "data": str(copy / "data"), **{**fields, "feature_steps": 6}}))
    # the same path with other content is still another input
    marker = copy / "data" / "_COMPLETE.json"
    marker.write_text(marker.read_text().replace('"finished"', '"finished_"'))
    assert not check_complete(copy / "samples" / "select", moved)  # select is re-made, not refused
    assert not (copy / "samples" / "select" / "_COMPLETE.json").exists()


def test_run_reuse_from_copies_finished_stages_and_sample_free_classifiers(chain, tmp_path, capsys):
    """`run --reuse-from`: a stage finished in another run with the same config and inputs is copied; an
    evaluation with other arms gets that run's finished real/classic classifiers, not its synthetic ones."""
    from histodiffusion.runtime.configtypes import config_to_dict
    from histodiffusion.runtime.reuse import check_source, reuse_stage
    from histodiffusion.runtime.rundirs import mark_complete

    data, samples = chain  # run A: tmp_path/{data,samples}
    with one_thread():
        assert _select(data, samples) == 0
        assert main(["evaluate", "--data", str(data), "--samples", str(samples), "--out", str(tmp_path / "eval"),
                     *EVALUATE[:2], "--arms", "real,classic,selected", *EVALUATE[4:]]) == 0
    b = tmp_path / "B"
    for d in ("data", "samples"):  # stages B already has: byte-identical copies
        shutil.copytree(tmp_path / d, b / d, ignore=shutil.ignore_patterns("select"))
    sel = build("select", {"samples": str(b / "samples"), "data": str(b / "data"), "subset": "train",
                           "backbone": "small_cnn_w8", "feature_steps": 5, "generative_metrics": False})
    assert reuse_stage(b / "samples" / "select", b, tmp_path, sel).startswith("copied from")
    assert check_complete(b / "samples" / "select", sel)
    assert reuse_stage(b / "samples" / "select", b, tmp_path, sel) == ""  # never over an existing directory
    c = tmp_path / "C"  # other samples: nothing copied, and the other run's selection stays complete
    shutil.copytree(b, c)
    shutil.rmtree(c / "samples" / "select")
    mark_complete(c / "samples", note="made again")  # another sample run: another hash
    sel_c = build("select", {**config_to_dict(sel), "samples": str(c / "samples"), "data": str(c / "data")})
    assert reuse_stage(c / "samples" / "select", c, tmp_path, sel_c) == ""
    assert check_complete(tmp_path / "samples" / "select", sel) and not (c / "samples" / "select").exists()
    # another harness: nothing; other arms, same harness: real and classic only
    ev = {"data": str(b / "data"), "samples": str(b / "samples"), "out": str(b / "eval"), "subset": "frac0.5",
          "ratios": [0.25], "seeds": [0], "backbone": "small_cnn_w8", "val_every": 0, "batch_size": 8}
    assert reuse_stage(b / "eval", b, tmp_path, build("evaluate", {**ev, "arms": ["real", "unselected"], "steps": 3})) == ""
    msg = reuse_stage(b / "eval", b, tmp_path, build("evaluate", {**ev, "arms": ["real", "unselected"], "steps": 2}))
    assert msg.startswith("2 finished sample-free classifier(s)")
    assert sorted(p.name for p in (b / "eval" / "classifiers").iterdir()) == ["classic_0", "real_0"]
    with one_thread():
        assert main(["evaluate", "--data", str(b / "data"), "--samples", str(b / "samples"), "--out", str(b / "eval"),
                     *EVALUATE[:2], "--arms", "real,unselected", *EVALUATE[4:]]) == 0
    got = json.loads((b / "eval" / "classifiers" / "real_0" / "scores.json").read_text())
    assert got == json.loads((tmp_path / "eval" / "classifiers" / "real_0" / "scores.json").read_text())
    assert (b / "eval" / "classifiers" / "unselected@0.25_0" / "_COMPLETE.json").is_file()
    with pytest.raises(HistoError, match="not a directory made by `histodiffusion run`"):
        check_source(str(tmp_path), str(b))
