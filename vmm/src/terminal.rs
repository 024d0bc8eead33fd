//! The serial console on a terminal: while the VM runs, stdin (when it is a
//! terminal) is in raw mode, so each keystroke reaches the guest at once and
//! the guest's line discipline does echo, editing and Ctrl-C/Ctrl-D (Ctrl-D
//! at the guest shell ends it and, with the userland initramfs, the VM). The
//! saved settings are restored when the guard drops.
//!
//! `vmm-sys-util`'s `Terminal::set_canon_mode` turns ICANON, ECHO and ISIG
//! on rather than restoring what was there, so the exact `termios` is kept
//! and put back here.

/// Raw mode on stdin for the guard's lifetime.
pub struct RawStdin {
    saved: libc::termios,
}

impl RawStdin {
    /// Raw mode if stdin is a terminal; `None` otherwise (a pipe, a file).
    pub fn new_if_tty() -> Option<Self> {
        // SAFETY: isatty on fd 0 has no side effects.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: an all-zero termios is a valid value to be overwritten.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is a terminal; `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // Keystrokes go to the guest as typed: no line buffering, no local
        // echo, no signals from Ctrl-C/Ctrl-Z/Ctrl-\ (the guest gets them),
        // no CR->NL translation; output processing stays as it was.
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::IXON);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: fd 0 is a terminal; `raw` is a valid termios.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { saved })
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        // SAFETY: restoring the settings read from the same terminal.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}
