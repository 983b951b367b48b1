//! How errors are written to the log: one line with every cause. Every part of the coordinator
//! logs through it, so it sits below all of them (it used to live in the API, which made every
//! component that logged an error import the module that imports them all).

/// An error and its causes on one line, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
