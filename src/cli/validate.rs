//! `vaultconn validate`'s file handling: files, directories (recursively: `*.yaml`, `*.yml`,
//! `*.json`, hidden entries skipped) and `-` for stdin, read in a stable order; the checks
//! themselves are `cli::manifest`.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::cli::error::CliError;
use crate::cli::manifest::{self, CheckOptions, Report};

/// One input: a name for messages and its text.
pub struct Input {
    pub name: String,
    pub text: String,
}

/// Read every input named on the command line.
pub fn read_inputs(paths: &[PathBuf]) -> Result<Vec<Input>, CliError> {
    let mut out = Vec::new();
    let mut stdin_read = false;
    for p in paths {
        if p.as_os_str() == "-" {
            if stdin_read {
                continue;
            }
            stdin_read = true;
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::Usage(format!("cannot read stdin: {e}")))?;
            out.push(Input {
                name: "<stdin>".into(),
                text,
            });
        } else if p.is_dir() {
            let mut files = Vec::new();
            walk(p, &mut files)?;
            files.sort();
            for f in files {
                out.push(read_file(&f)?);
            }
        } else {
            out.push(read_file(p)?);
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), CliError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", dir.display())))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| CliError::Usage(format!("cannot read {}: {e}", dir.display())))?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            walk(&path, out)?;
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            out.push(path);
        }
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Input, CliError> {
    let bytes = std::fs::read(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| CliError::Usage(format!("cannot read {}: not UTF-8 text", path.display())))?;
    Ok(Input {
        name: path.display().to_string(),
        text,
    })
}

/// Parse and check every input. `spec_schema`: the CRD's `spec` schema.
pub fn check_inputs(
    inputs: &[Input],
    spec_schema: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
    opts: &CheckOptions,
) -> Report {
    let mut docs = Vec::new();
    let mut yaml_problems = Vec::new();
    for input in inputs {
        let (d, p) = manifest::parse_documents(&input.name, &input.text);
        docs.extend(d);
        yaml_problems.extend(p);
    }
    let mut report = manifest::check_documents(&docs, spec_schema, opts);
    report.documents += yaml_problems.len();
    report.files = inputs.len();
    report.add(yaml_problems);
    report
}
