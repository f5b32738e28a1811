//! The problems `vaultconn validate` reports, and the `# expect:` lines with which the corpus
//! files (`tests/cli-corpus`, `tests/bad-input-corpus`) state them.
#![allow(dead_code)]
use serde_json::Value;

/// One problem `vaultconn validate` reported (or a corpus file's `# expect:` line states).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub error: bool,
    pub document: usize,
    pub path: String,
    /// `schema`, `validation`, `credentials` or `conflict` (empty for an `# expect:` line).
    pub check: String,
    pub message: String,
}

impl Problem {
    /// The same problem without the check, to compare with `# expect:` lines.
    pub fn stated(&self) -> Problem {
        Problem {
            check: String::new(),
            ..self.clone()
        }
    }
}

/// The `# expect: DOCUMENT PATH | MESSAGE` (errors) and `# expect-warning: …` lines of a
/// corpus file; a PATH of `-` stands for none.
pub fn expectations(text: &str) -> Vec<Problem> {
    text.lines()
        .filter_map(|l| {
            let (error, rest) = match l.strip_prefix("# expect: ") {
                Some(r) => (true, r),
                None => (false, l.strip_prefix("# expect-warning: ")?),
            };
            let (place, message) = rest.split_once(" | ").expect("DOCUMENT PATH | MESSAGE");
            let (doc, path) = place.split_once(' ').expect("DOCUMENT PATH");
            Some(Problem {
                error,
                document: doc.parse().expect("a document number"),
                path: if path == "-" {
                    String::new()
                } else {
                    path.into()
                },
                check: String::new(),
                message: message.into(),
            })
        })
        .collect()
}

/// The problems of a `vaultconn validate -o json` report.
pub fn problems_of(report: &Value) -> Vec<Problem> {
    report["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Problem {
            error: p["severity"] == "error",
            document: p["document"].as_u64().unwrap() as usize,
            path: p["path"].as_str().unwrap().to_string(),
            check: p["check"].as_str().unwrap().to_string(),
            message: p["message"].as_str().unwrap().to_string(),
        })
        .collect()
}
