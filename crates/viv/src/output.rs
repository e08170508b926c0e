//! Terminal output: tables, JSON, and progress for long image builds.

use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Prints rows under a header, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Prints a value as pretty JSON.
pub fn json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
}

/// Image-build progress: a spinner with the current stage and its latest line on a terminal,
/// plain stage lines otherwise.
pub struct TerminalProgress {
    bar: Option<ProgressBar>,
}

impl TerminalProgress {
    /// Progress on stderr.
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix:.bold} {wide_msg}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self { bar }
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl viv_image::Progress for TerminalProgress {
    fn stage(&self, title: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_prefix(title.to_owned());
                bar.set_message("");
            }
            None => eprintln!("==> {title}"),
        }
    }
    fn detail(&self, line: &str) {
        if let Some(bar) = &self.bar {
            bar.set_message(line.chars().take(120).collect::<String>());
        }
    }
    fn done(&self, summary: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("✓ {summary}")),
            None => eprintln!("==> {summary}"),
        }
    }
}
