//! `${VAR}` and `${VAR|default}` in string values, replaced from the environment before the file is
//! read as a configuration, so that secrets stay out of it.
//!
//! Redaction: a substituted value is often a secret (`uri = "${STORE_URI}"`), so no error of this
//! module quotes one. An unset variable is named, not its would-be value; a value with an unclosed
//! `${` is quoted redacted by [`crate::redact::redact`] (it may be a connection string with its
//! password). Values that reach the resolved configuration keep their secrets in
//! [`crate::redact::ConnectionString`]s.

use std::collections::BTreeMap;

use super::error::{Invalid, Problem};

/// Replace the variables in every string value of `table`, whose keys are under `prefix`.
pub(super) fn substitute(
    table: &mut toml::Table,
    prefix: &str,
    env: &BTreeMap<String, String>,
) -> Result<(), Invalid> {
    for (key, value) in table.iter_mut() {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        substitute_value(value, &path, env)?;
    }
    Ok(())
}

fn substitute_value(
    value: &mut toml::Value,
    path: &str,
    env: &BTreeMap<String, String>,
) -> Result<(), Invalid> {
    match value {
        toml::Value::String(s) => *s = expand(s, env).map_err(|p| Invalid::new(path, p))?,
        toml::Value::Table(t) => substitute(t, path, env)?,
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_value(item, &format!("{path}[{i}]"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(text: &str, env: &BTreeMap<String, String>) -> Result<String, Problem> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            return Err(Problem::UnclosedVariable {
                text: crate::redact::redact(text),
            });
        };
        let inner = &rest[start + 2..start + end];
        let (name, default) = match inner.split_once('|') {
            Some((name, default)) => (name, Some(default)),
            None => (inner, None),
        };
        match (env.get(name), default) {
            (Some(value), _) => out.push_str(value),
            (None, Some(default)) => out.push_str(default),
            (None, None) => {
                return Err(Problem::UnsetVariable {
                    name: name.to_owned(),
                })
            }
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand_with(text: &str, env: &[(&str, &str)]) -> Result<String, Problem> {
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        expand(text, &env)
    }

    #[test]
    fn variables_are_replaced_or_defaulted() {
        assert_eq!(
            expand_with("${A}/${B|b}/${C|}", &[("A", "a")]).unwrap(),
            "a/b/"
        );
    }

    #[test]
    fn an_unclosed_variable_is_quoted_without_its_password() {
        let problem = expand_with("postgresql://app:s3cret@db/${DB", &[]).unwrap_err();
        let line = problem.to_string();
        assert_eq!(
            line,
            "unclosed ${ in \"postgresql://app:***@db/${DB\"; write ${VAR} or ${VAR|default}"
        );
        assert!(!line.contains("s3cret"), "{line}");
    }
}
