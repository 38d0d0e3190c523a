//! A one-line progress indicator on stderr, shown only when stderr is a terminal, so scripts and
//! `--json` consumers never see it and stdout carries nothing but the report.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often the line is redrawn at most: fast enough to look alive, rare enough to cost nothing.
const REDRAW_EVERY: Duration = Duration::from_millis(200);

/// The progress line of one long-running tool.
pub struct Progress {
    enabled: bool,
    last_draw: Option<Instant>,
    width: usize,
}

impl Progress {
    /// A progress line, drawn only when stderr is a terminal.
    pub fn new() -> Self {
        Self {
            enabled: std::io::stderr().is_terminal(),
            last_draw: None,
            width: 0,
        }
    }

    /// Redraws the line with `text` (built lazily, and only when a redraw is due).
    pub fn update(&mut self, text: impl FnOnce() -> String) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .last_draw
            .is_some_and(|last| now.duration_since(last) < REDRAW_EVERY)
        {
            return;
        }
        self.last_draw = Some(now);
        let text = text();
        let width = text.chars().count();
        // Pad over the remains of a longer previous line.
        let pad = self.width.saturating_sub(width);
        self.width = width;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{text}{}", " ".repeat(pad));
        let _ = err.flush();
    }

    /// Erases the line, before the report is printed.
    pub fn finish(&mut self) {
        if self.enabled && self.width > 0 {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{}\r", " ".repeat(self.width));
            let _ = err.flush();
            self.width = 0;
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
