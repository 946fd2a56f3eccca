"""Cycles renders without the log wall: `Fra:` status lines are dropped, errors still reach the user."""

from __future__ import annotations

import os

import pytest

from near_engine.cycles.quiet import blender_output_filtered

pytestmark = pytest.mark.timeout(120)


def test_status_lines_are_dropped_and_the_rest_goes_to_stderr(capfd, monkeypatch) -> None:
    monkeypatch.delenv("NEAR_VERBOSE", raising=False)
    with blender_output_filtered():
        os.write(1, b"Fra:1 Mem:8.16M | Scene, ViewLayer | Synchronizing object\nSaved: '/tmp/x.exr'\n"
                    b"Error: something Blender wanted said\n")
    out, err = capfd.readouterr()
    assert out == "" and err == "Error: something Blender wanted said\n"

    monkeypatch.setenv("NEAR_VERBOSE", "1")
    with blender_output_filtered():
        os.write(1, b"Fra:1 shown when asked\n")
    assert capfd.readouterr().out == "Fra:1 shown when asked\n"


@pytest.mark.cycles
def test_a_failing_render_still_says_why(tmp_path, capfd, monkeypatch) -> None:
    bpy = pytest.importorskip("bpy")
    from near_engine.cycles.quiet import render_still
    from near_engine.cycles.settings import RenderSettings, configure_cycles
    from near_engine.cycles.views import add_camera

    monkeypatch.delenv("NEAR_VERBOSE", raising=False)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    configure_cycles(scene, RenderSettings(size=8, samples=1, denoise=False))
    add_camera(scene, 40.0)
    render_still(scene, str(tmp_path / "ok.exr"))
    assert (tmp_path / "ok.exr").is_file()
    (tmp_path / "file").write_text("")
    with pytest.raises(RuntimeError, match="cannot save"):
        render_still(scene, str(tmp_path / "file" / "no.exr"))  # a folder that is a file
    out, err = capfd.readouterr()
    assert "Fra:" not in out + err and "cannot save" in out + err  # Blender reports through sys.stdout
