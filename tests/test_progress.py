"""`near_engine.progress`: a bar redrawn in place on a terminal, a few lines in a log (no log wall)."""

from __future__ import annotations

import io

from near_engine.progress import Progress, progress


class Terminal(io.StringIO):
    """A text stream that says it is a terminal, as sys.stderr does in an interactive shell."""

    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_per_tenth_with_counts_and_time_left() -> None:
    lines: list[str] = []
    assert list(progress(range(100), "rendering", log=lines.append)) == list(range(100))
    assert len(lines) == 10
    assert lines[0].startswith("rendering: 10/100 (10%), 0m00s elapsed, ") and lines[0].endswith(" left")
    assert lines[-1].startswith("rendering: 100/100 (100%)")


def test_a_file_stream_gets_lines_and_a_terminal_gets_one_bar() -> None:
    log_file = io.StringIO()
    with Progress("encoding", 7, stream=log_file) as bar:
        for _ in range(7):
            bar.advance()
    assert log_file.getvalue().splitlines()[-1].startswith("encoding: 7/7 (100%)")
    assert "\r" not in log_file.getvalue() and len(log_file.getvalue().splitlines()) == 7

    terminal = Terminal()
    with Progress("encoding", 4, stream=terminal) as bar:
        for _ in range(4):
            bar.advance()
        bar.say("a note")
    text = terminal.getvalue()
    assert text.count("\n") == 2  # the note, and the end of the bar: the bar itself is redrawn in place
    assert "\r\033[Ka note\n" in text
    assert text.rstrip("\n").rsplit("\r", 1)[-1].startswith("\033[Kencoding [" + "#" * 24 + "] 4/4 (100%)")
    assert "0m00s left" in text


def test_a_failed_stage_can_be_skipped_ahead_and_unknown_totals_stay_silent() -> None:
    lines: list[str] = []
    bar = Progress("datagen", 20, log=lines.append)
    bar.advance(15)
    assert bar.done == 15 and lines[-1].startswith("datagen: 15/20 (75%)")
    bar.advance(100)
    assert bar.done == 20 and lines[-1].startswith("datagen: 20/20 (100%)")
    assert list(progress(iter("abc"), "stage", log=lines.append)) == ["a", "b", "c"] and len(lines) == 2
