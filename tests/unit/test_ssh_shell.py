"""Typed command lines rebuilt from the keys and the echoed screen (gatekeep.protocols.ssh._shell, pyte)."""

from gatekeep.protocols.ssh._shell import ShellLine


def _typed(shell, prompt=b"user@host:~$ "):
    shell.output(prompt)
    shell.begin()
    return shell


def test_echoed_line_after_the_prompt():
    """The line is what was echoed after the prompt, without the prompt."""
    s = _typed(ShellLine(80, 24))
    s.output(b"ls -la /tmp")
    assert s.line() == "ls -la /tmp"


def test_line_editing_is_applied():
    """Backspaces and erase sequences of the shell's line editor are applied before the line is read."""
    s = _typed(ShellLine(80, 24))
    s.output(b"rm -rf /tmp/a\x08\x08\x08\x08\x08\x08\x1b[K/home")
    assert s.line() == "rm -rf /home"


def test_history_recall_redraw():
    """A line recalled from history and redrawn by the shell reads as the recalled text."""
    s = _typed(ShellLine(80, 24))
    s.output(b"echo new")
    s.output(b"\r\x1b[Kuser@host:~$ reboot")
    assert s.line() == "reboot"


def test_wrapped_and_scrolled_line():
    """A line longer than the terminal wraps (and scrolls at the bottom) and still reads whole."""
    s = ShellLine(20, 3)
    s.output(b"\r\n\r\n")
    _typed(s, b"$ ")
    s.output(b"echo " + b"a" * 50)
    assert s.line() == "echo " + "a" * 50


def test_tab_completion_shows_on_screen():
    """What tab completion adds is part of the line because the shell echoes it."""
    s = _typed(ShellLine(80, 24))
    s.output(b"cat /etc/pas")
    s.output(b"swd ")
    assert s.line() == "cat /etc/passwd"


def test_split_at_enter_outside_paste():
    """Input splits at the first CR or LF, except inside a bracketed paste (once the shell asked for them)."""
    s = ShellLine()
    s.output(b"\x1b[?2004h")  # bash and zsh turn bracketed paste on at their prompt
    assert s.split(b"ls\rpwd\r") == (b"ls", b"\r", b"pwd\r")
    assert s.split(b"\x1b[200~a\rb\x1b[201~c\nrest") == (b"\x1b[200~a\rb\x1b[201~c", b"\n", b"rest")
    assert s.split(b"no enter") == (b"no enter", None, b"")


def test_a_paste_marker_to_a_shell_that_did_not_ask_for_bracketed_paste_hides_nothing():
    """A client sends ESC[200~ and never ends the paste: to a shell that did not turn bracketed paste on (dash,
    or bash after ESC[?2004l) the marker is a few keys, and the Enter after it submits the line: it is split
    there, so the line is judged."""
    s = ShellLine()
    assert s.split(b"\x1b[200~rm -f x\r") == (b"\x1b[200~rm -f x", b"\r", b"")
    s.output(b"\x1b[?2004h\x1b[?2004l")
    assert s.split(b"\x1b[200~rm -f x\r") == (b"\x1b[200~rm -f x", b"\r", b"")


def test_ctrl_o_submits_a_line():
    """readline's operate-and-get-next (Ctrl-O) runs the line as Enter does: it is a submit key too."""
    assert ShellLine().split(b"rm -f x\x0frest") == (b"rm -f x", b"\x0f", b"rest")


def test_full_screen_programs_are_detected():
    """The alternate screen (vim, less) marks the shell as full screen, and leaving it clears that."""
    s = ShellLine()
    s.output(b"\x1b[?1049h")
    assert s.full_screen
    s.output(b"\x1b[?1049l")
    assert not s.full_screen


def test_fresh_and_reset():
    """A line is fresh until begin() and again after reset()."""
    s = ShellLine()
    assert s.fresh and s.line() == ""
    s.begin()
    assert not s.fresh
    s.reset()
    assert s.fresh


def test_resize_keeps_working():
    """After a resize the line is still read from the screen."""
    s = _typed(ShellLine(80, 24))
    s.resize(120, 40)
    s.output(b"uptime")
    assert s.line() == "uptime"


def test_the_screen_model_keeps_to_its_size_limits():
    """A pty-req or window-change may claim up to 2**32-1 rows and columns, and pyte allocates per row (2e7 rows
    took 1.1 GiB): the model stays within MAX_COLS x MAX_ROWS (and at least 2 x 2), and still reads lines."""
    from gatekeep.protocols.ssh import _shell

    s = ShellLine(100_000, 100_000)
    assert s.screen.columns < 100_000 and s.screen.lines < 100_000
    assert (s.screen.columns, s.screen.lines) == (_shell.MAX_COLS, _shell.MAX_ROWS)
    s.resize(0, 100_000)
    assert (s.screen.columns, s.screen.lines) == (2, _shell.MAX_ROWS)
    s.resize(100_000, 1)
    assert (s.screen.columns, s.screen.lines) == (_shell.MAX_COLS, 2)
    _typed(s, b"$ ")
    s.output(b"uptime")
    assert s.line() == "uptime"


def test_reset_forgets_that_a_line_was_unreadable():
    """``unreadable`` (set by the relay when the model starts afresh mid-line) lasts until the line is done."""
    s = ShellLine()
    s.unreadable = "lost"
    s.begin()
    assert s.unreadable == "lost"
    s.reset()
    assert s.unreadable is None
