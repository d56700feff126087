"""sparse_lth.overlap and `sparse-lth overlap`: the overlap of two experiments' masks."""
import dataclasses
import os
import shutil

import pytest
import torch

from sparse_lth.cli import main
from sparse_lth.overlap import mask_overlap, overlap, overlap_markdown
from test_imp import load_masks, run, tiny_hp


def test_mask_overlap_counts():
    a = {"x": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool), "y": torch.ones(3, dtype=torch.bool)}
    b = {"x": torch.tensor([[1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool), "y": torch.tensor([True, False, True])}
    o = mask_overlap(a, b)
    x = o["x"]
    assert (x["live_a"], x["live_b"], x["shared"], x["total"]) == (3, 4, 2, 8)
    assert x["jaccard"] == pytest.approx(2 / 5) and x["of_a"] == pytest.approx(2 / 3) and x["of_b"] == 0.5
    assert x["chance"] == pytest.approx(3 * 4 / 8) and x["enrichment"] == pytest.approx(2 / 1.5)
    y = o["y"]
    assert (y["shared"], y["jaccard"], y["of_b"]) == (2, pytest.approx(2 / 3), 1.0)
    al = o["all"]
    assert (al["live_a"], al["live_b"], al["shared"], al["total"]) == (6, 6, 4, 11)
    assert al["chance"] == pytest.approx(1.5 + 2.0) and al["enrichment"] == pytest.approx(4 / 3.5)
    same = mask_overlap(a, a)["all"]
    assert same["jaccard"] == 1.0 and same["of_a"] == same["of_b"] == 1.0
    with pytest.raises(ValueError, match="layer x: masks of shapes"):
        mask_overlap(a, {"x": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="share no layer"):
        mask_overlap(a, {"z": torch.ones(3, dtype=torch.bool)})


def test_overlap_of_two_runs(tmp_path):
    """IMP against one-shot pruning at each level: round 1 prunes the same dense network by the same amount, so the
    masks are the same; later rounds share what the saved masks share."""
    hp = tiny_hp(rounds=3)
    imp = run(hp, tmp_path)
    one = run(dataclasses.replace(hp, control="oneshot", oneshot_levels=True), tmp_path)
    d = overlap(imp.experiment_dir, one.experiment_dir)
    assert [row["round"] for row in d["rounds"]] == [0, 1, 2, 3] and d["seed_b"] == 0
    assert d["rounds"][1]["layers"]["all"]["jaccard"] == 1.0
    for row in d["rounds"]:
        want = mask_overlap(load_masks(imp.experiment_dir, 0, row["round"]),
                            load_masks(one.experiment_dir, 0, row["round"]))
        assert row["layers"] == want
        assert row["percent_a"] == pytest.approx(imp.metrics[0][row["round"]]["percent_remaining"])
    assert d["rounds"][3]["layers"]["all"]["jaccard"] < 1.0  # one-shot's later masks differ from IMP's
    assert [row["round"] for row in overlap(imp.experiment_dir, one.experiment_dir, rounds=[3])["rounds"]] == [3]
    md = overlap_markdown([d])
    assert "| 1 | " in md and "Round 3, by layer:" in md and "| all |" in md
    with pytest.raises(ValueError, match=r"rounds \[7\] of A have no finished round in B"):
        overlap(imp.experiment_dir, one.experiment_dir, rounds=[7])
    with pytest.raises(FileNotFoundError, match="no replicate 4"):
        overlap(imp.experiment_dir, one.experiment_dir, seed_a=4)


def test_overlap_command(tmp_path, capsys):
    hp = tiny_hp(rounds=2)
    imp = run(hp, tmp_path / "runs", replicates=2)
    other = run(dataclasses.replace(hp, prune_score="movement"), tmp_path / "runs", replicates=2)
    out = tmp_path / "ov"
    assert main(["overlap", imp.experiment_dir, other.experiment_dir, "--out", str(out), "--title", "t"]) == 0
    text = capsys.readouterr().out
    assert text.count("## `") == 2 and "(seed 1) against" in text and "prune_score=movement" in text
    assert (out / "overlap.png").stat().st_size > 0 and "# Mask overlap: t" in (out / "overlap.md").read_text()
    # across seeds: seed 0 of the run against its seed 1 (other initial weights: other masks)
    assert main(["overlap", imp.experiment_dir, imp.experiment_dir, "--seeds", "0", "--seed-b", "1", "--out",
                 str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("## `") == 1 and "(seed 0) against" in text and "(seed 1): itself, seed 0 vs 1" in text
    assert main(["overlap", imp.experiment_dir, other.experiment_dir, "--seeds", "0,1", "--seed-b", "1"]) == 2
    assert "give at most one --seeds" in capsys.readouterr().err
    # an experiment against itself on the same seeds: a Jaccard of 1 that says nothing (it printed one)
    for extra in ([], ["--seeds", "1"], ["--seeds", "0", "--seed-b", "0"]):
        assert main(["overlap", imp.experiment_dir, imp.experiment_dir + os.sep, *extra]) == 2, extra
        assert "a replicate against itself shares every weight" in capsys.readouterr().err
    assert main(["overlap", imp.experiment_dir, str(tmp_path)]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
    assert os.path.isdir(out)
    # a replicate just started (no finished round) beside the others: left out, said so (the command stopped)
    os.makedirs(os.path.join(other.experiment_dir, "seed_2"))
    os.makedirs(os.path.join(imp.experiment_dir, "seed_2"))
    assert main(["overlap", imp.experiment_dir, other.experiment_dir, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("## `") == 2 and "seed(s) [2] left out, no finished round yet" in captured.err


def test_overlap_by_weights_remaining(tmp_path):
    """match="remaining": each round of A against B's round nearest in weights remaining (within 10%): one round
    of 36% pruning sits beside two of 20%."""
    a = run(tiny_hp(rounds=3), tmp_path)
    b = run(tiny_hp(rounds=1, prune_fc=0.36, prune_output=0.19), tmp_path)
    d = overlap(a.experiment_dir, b.experiment_dir, match="remaining")
    assert [(row["round"], row["round_b"]) for row in d["rounds"]] == [(0, 0), (2, 1)]
    assert d["rounds"][1]["percent_b"] == pytest.approx(b.metrics[0][1]["percent_remaining"])
    assert d["rounds"][1]["layers"] == mask_overlap(load_masks(a.experiment_dir, 0, 2),
                                                    load_masks(b.experiment_dir, 0, 1))
    assert "| 2 / 1 |" in overlap_markdown([d]) and "Round 2 / 1, by layer:" in overlap_markdown([d])
    assert [row["round"] for row in overlap(a.experiment_dir, b.experiment_dir)["rounds"]] == [0, 1]  # by round
    with pytest.raises(ValueError, match=r"rounds \[1\] of A have no round as sparse in B"):
        overlap(a.experiment_dir, b.experiment_dir, rounds=[1], match="remaining")
    with pytest.raises(ValueError, match="match must be 'round' or 'remaining'"):
        overlap(a.experiment_dir, b.experiment_dir, match="nearest")
    # a replicate that has not finished a round yet (a run just started) is named as such
    fresh = tmp_path / "fresh" / os.path.basename(b.experiment_dir)
    shutil.copytree(b.experiment_dir, fresh)
    for d in (fresh / "seed_0").glob("round_*"):
        shutil.rmtree(d)
    with pytest.raises(ValueError, match=r"fresh/.* \(seed 0\) has no finished round yet"):
        overlap(a.experiment_dir, str(fresh))
