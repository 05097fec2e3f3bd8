//! The replay progress bar: shown only when stderr is a terminal and a trace has been replaying
//! for more than a second, so short runs and pipes stay quiet.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};
use tessera::replay::Policy;

/// Delay before the bar appears.
const SHOW_AFTER: Duration = Duration::from_secs(1);

pub(crate) struct Progress {
    name: String,
    events: usize,
    policies: usize,
    done_policies: usize,
    last_policy: Option<Policy>,
    start: Instant,
    terminal: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub(crate) fn new(name: &str, events: usize, policies: usize) -> Progress {
        Progress {
            name: name.to_string(),
            events,
            policies,
            done_policies: 0,
            last_policy: None,
            start: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
            bar: None,
        }
    }

    /// `done` events of `policy`'s replay are done.
    pub(crate) fn update(&mut self, policy: Policy, done: usize) {
        if self.last_policy != Some(policy) {
            if self.last_policy.is_some() {
                self.done_policies += 1;
            }
            self.last_policy = Some(policy);
        }
        if !self.terminal {
            return;
        }
        if self.bar.is_none() && self.start.elapsed() >= SHOW_AFTER {
            let total = (self.events * self.policies) as u64;
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {percent:>3}% {per_sec:>12} eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            self.bar = Some(bar);
        }
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{} {}", self.name, policy));
            bar.set_position((self.done_policies * self.events + done) as u64);
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
