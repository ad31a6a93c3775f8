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
    """Input splits at the first CR or LF, except inside a bracketed paste."""
    s = ShellLine()
    assert s.split(b"ls\rpwd\r") == (b"ls", b"\r", b"pwd\r")
    assert s.split(b"\x1b[200~a\rb\x1b[201~c\nrest") == (b"\x1b[200~a\rb\x1b[201~c", b"\n", b"rest")
    assert s.split(b"no enter") == (b"no enter", None, b"")


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
