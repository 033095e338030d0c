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


def test_stories_offline_or_with_a_missing_file_say_so_in_one_line(tmp_path, monkeypatch, capsys):
    """Offline with no data/names.txt: one line naming this command's option (--data_path; it said fit's
    --data.path) and exit 2, not a traceback; the same for a --data_path that does not exist. Nothing written."""
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert main(["--out", "s"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data/names.txt is missing and downloading") and err.count("\n") == 1, err
    assert err.rstrip().endswith("copy names.txt to data/names.txt or pass --data_path FILE"), err
    assert main(["--out", "s", "--data_path", "nowhere.txt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere.txt" in err and err.count("\n") == 1, err
    assert "--data_path" in err and "--data.path" not in err, err  # this command's option, not fit's
    assert list(tmp_path.iterdir()) == []
