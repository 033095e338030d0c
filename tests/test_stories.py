"""`python -m mm_lightning.stories`: the init stories side by side, one PNG per diagnostic and one run per story."""

from __future__ import annotations

import pytest

from mm_lightning.lecture.stories import STORIES, main
from tests.conftest import tb_tags


@pytest.mark.slow
def test_stories_draw_one_picture_per_diagnostic_and_a_run_per_story(names_file, tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--data_path", str(names_file)]) == 0
    said = capsys.readouterr()
    assert len(said.out.splitlines()) <= len(STORIES) + 4 and not said.err, said  # one summary, not six fits' output
    assert "Params" not in said.out  # no model summary
    for kind in ("activations", "gradients"):
        assert (tmp_path / f"{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stds = {}
    for name in STORIES:  # one TensorBoard run per story under one log directory: TensorBoard overlays them
        logged = tb_tags(tmp_path / name / "lightning_logs" / "version_0")  # tags numbered by depth: sorted, in order
        stds[name] = [p[0][1] for k, p in sorted(logged.items()) if k.startswith("1 activations/output std · ")]
        assert len(stds[name]) == 5, name
    assert min(stds["deep_nobn_gain1"]) < 0.35 < 0.6 < max(stds["deep_nobn_gain1"])  # shrinking layer by layer
    for name in ("deep_bn_gain1", "deep_bn_gain3"):  # with BatchNorm the gain does not matter (but for BN's eps)
        assert stds[name] == pytest.approx(stds["deep_bn"], rel=1e-3)
