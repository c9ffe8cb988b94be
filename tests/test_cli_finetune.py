"""`gitcap finetune` refusing what cannot train, in one line, before any model loads."""

from __future__ import annotations

from jobs.cli import main
from pipeline.scenes import write_scenes


def test_an_eval_fraction_that_holds_out_every_pair_says_so(tmp_path, capsys):
    write_scenes(str(tmp_path / "pairs"), count=8, seed=0, shard_size=4)
    status = main(["finetune", str(tmp_path / "pairs"), "--out", str(tmp_path / "out"), "--steps", "1",
                   "--eval-fraction", "1.0"])
    assert status == 2
    assert capsys.readouterr().err == (
        f"gitcap finetune: error: the eval fraction 1.0 holds out all 8 pairs read from ['{tmp_path / 'pairs'}']: "
        "nothing is left to train on; lower it, or give held-out data of its own (the eval input)\n"
    )
    assert not (tmp_path / "out").exists()
