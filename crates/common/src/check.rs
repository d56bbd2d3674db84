//! The report `--check` prints: one line per step with its verdict, a hint under each failure.

use std::fmt::Write as _;

/// The request `--check` sends through the mesh (the client) or to the backend (the listener).
#[derive(Debug, Clone)]
pub struct CheckRequest {
    /// Host header (`--host`).
    pub host: String,
    /// Path and query (`--path`).
    pub path: String,
}

/// A step's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Works.
    Ok,
    /// Works, but worth a look (does not fail the check).
    Warn,
    /// Broken: the check exits non-zero.
    Fail,
}

/// One checked step.
#[derive(Debug, Clone)]
pub struct Step {
    /// Verdict.
    pub verdict: Verdict,
    /// What was checked (`upstream 10.0.0.12:8443: TLS handshake`).
    pub what: String,
    /// What was found.
    pub detail: String,
    /// What to do about it, for warnings and failures.
    pub hint: Option<String>,
}

/// The steps of one `--check` run, in order.
#[derive(Debug, Default)]
pub struct Report {
    /// Every step so far.
    pub steps: Vec<Step>,
}

impl Report {
    /// Records a step that worked.
    pub fn ok(&mut self, what: impl Into<String>, detail: impl Into<String>) {
        self.push(Verdict::Ok, what, detail, None::<String>);
    }

    /// Records a warning.
    pub fn warn(
        &mut self,
        what: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.push(Verdict::Warn, what, detail, Some(hint));
    }

    /// Records a failure.
    pub fn fail(
        &mut self,
        what: impl Into<String>,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.push(Verdict::Fail, what, detail, Some(hint));
    }

    fn push(
        &mut self,
        verdict: Verdict,
        what: impl Into<String>,
        detail: impl Into<String>,
        hint: Option<impl Into<String>>,
    ) {
        self.steps.push(Step {
            verdict,
            what: what.into(),
            detail: detail.into(),
            hint: hint.map(Into::into),
        });
    }

    /// True when no step failed.
    pub fn passed(&self) -> bool {
        self.steps.iter().all(|s| s.verdict != Verdict::Fail)
    }

    /// The report as text, one line per step.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for step in &self.steps {
            let tag = match step.verdict {
                Verdict::Ok => "[ OK ]",
                Verdict::Warn => "[WARN]",
                Verdict::Fail => "[FAIL]",
            };
            let _ = writeln!(out, "{tag} {}: {}", step.what, step.detail);
            if let Some(hint) = &step.hint {
                let _ = writeln!(out, "       hint: {hint}");
            }
        }
        let failed = self
            .steps
            .iter()
            .filter(|s| s.verdict == Verdict::Fail)
            .count();
        if failed == 0 {
            let _ = writeln!(out, "check passed ({} steps)", self.steps.len());
        } else {
            let _ = writeln!(out, "check FAILED: {failed} of {} steps", self.steps.len());
        }
        out
    }
}
