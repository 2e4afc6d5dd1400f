//! Label selectors: comma-separated terms that must all hold.
//!
//! - `key=value`: the label is present with that value;
//! - `key!=value`: the label is absent or has another value;
//! - `key in (a, b)`: the label has one of the values;
//! - `key`: the label is present; `!key`: it is absent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// Why a selector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error(
        "selector is empty; write terms like key=value, key in (a,b), !key separated by commas"
    )]
    Empty,
    #[error("selector term {0:?} is not key=value, key!=value, key in (a,b), key or !key")]
    NotAPair(String),
    #[error("selector term {0:?} has an empty key")]
    EmptyKey(String),
    #[error("selector names label {0:?} twice")]
    Duplicate(String),
    #[error("selector has an unbalanced parenthesis")]
    Unbalanced,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String),
    NotEquals(String),
    In(BTreeSet<String>),
    Exists,
    Absent,
}

/// A conjunction of terms, one per label key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    terms: BTreeMap<String, Term>,
}

impl Selector {
    /// Whether every term holds for `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|(key, term)| {
            let value = labels.get(key);
            match term {
                Term::Equals(v) => value == Some(v),
                Term::NotEquals(v) => value != Some(v),
                Term::In(set) => value.is_some_and(|v| set.contains(v)),
                Term::Exists => value.is_some(),
                Term::Absent => value.is_none(),
            }
        })
    }
}

/// Splits on commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, SelectorError> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth < 0 {
            return Err(SelectorError::Unbalanced);
        }
    }
    if depth != 0 {
        return Err(SelectorError::Unbalanced);
    }
    out.push(&text[start..]);
    Ok(out)
}

fn is_key(key: &str) -> bool {
    !key.is_empty() && !key.contains(char::is_whitespace) && !key.contains(['=', '!', '(', ')'])
}

fn parse_term(term: &str) -> Result<(String, Term), SelectorError> {
    let bad = || SelectorError::NotAPair(term.to_owned());
    if let Some((key, value)) = term.split_once("!=") {
        return Ok((
            key.trim().to_owned(),
            Term::NotEquals(value.trim().to_owned()),
        ));
    }
    if let Some((key, value)) = term.split_once('=') {
        return Ok((key.trim().to_owned(), Term::Equals(value.trim().to_owned())));
    }
    if let Some((key, rest)) = term.split_once(" in ") {
        let list = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(bad)?;
        let values = list
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect::<BTreeSet<_>>();
        if values.is_empty() || !is_key(key.trim()) {
            return Err(bad());
        }
        return Ok((key.trim().to_owned(), Term::In(values)));
    }
    if let Some(key) = term.strip_prefix('!') {
        return if is_key(key.trim()) {
            Ok((key.trim().to_owned(), Term::Absent))
        } else {
            Err(bad())
        };
    }
    if is_key(term) {
        Ok((term.to_owned(), Term::Exists))
    } else {
        Err(bad())
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut terms = BTreeMap::new();
        for term in split_terms(text)?
            .into_iter()
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            let (key, parsed) = parse_term(term)?;
            if key.is_empty() {
                return Err(SelectorError::EmptyKey(term.to_owned()));
            }
            if terms.insert(key.clone(), parsed).is_some() {
                return Err(SelectorError::Duplicate(key));
            }
        }
        if terms.is_empty() {
            return Err(SelectorError::Empty);
        }
        Ok(Self { terms })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (ix, (key, term)) in self.terms.iter().enumerate() {
            if ix > 0 {
                f.write_str(",")?;
            }
            match term {
                Term::Equals(v) => write!(f, "{key}={v}")?,
                Term::NotEquals(v) => write!(f, "{key}!={v}")?,
                Term::In(set) => {
                    let list: Vec<&str> = set.iter().map(String::as_str).collect();
                    write!(f, "{key} in ({})", list.join(","))?;
                }
                Term::Exists => write!(f, "{key}")?,
                Term::Absent => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_term_must_match() {
        let sel: Selector = "site=lab, arch=x86_64".parse().unwrap();
        assert!(sel.matches(&labels(&[("site", "lab"), ("arch", "x86_64"), ("x", "y")])));
        assert!(!sel.matches(&labels(&[("site", "lab")])));
        assert!(!sel.matches(&labels(&[("site", "lab"), ("arch", "aarch64")])));
        assert!(!sel.matches(&BTreeMap::new()));
    }

    #[test]
    fn in_sets_presence_absence_and_inequality() {
        let sel: Selector = "site in (lab, depot), gpu, !quarantine, tier!=canary"
            .parse()
            .unwrap();
        assert!(sel.matches(&labels(&[("site", "depot"), ("gpu", "orin")])));
        assert!(!sel.matches(&labels(&[("site", "home"), ("gpu", "orin")])));
        assert!(!sel.matches(&labels(&[("site", "lab")])), "gpu missing");
        assert!(!sel.matches(&labels(&[
            ("site", "lab"),
            ("gpu", "x"),
            ("quarantine", "")
        ])));
        assert!(!sel.matches(&labels(&[
            ("site", "lab"),
            ("gpu", "x"),
            ("tier", "canary")
        ])));
        assert_eq!(
            sel.to_string(),
            "gpu,!quarantine,site in (depot,lab),tier!=canary"
        );
        assert_eq!(sel.to_string().parse::<Selector>().unwrap(), sel);
    }

    #[test]
    fn an_empty_value_matches_an_empty_label() {
        let sel: Selector = "tier=".parse().unwrap();
        assert!(sel.matches(&labels(&[("tier", "")])));
        assert!(!sel.matches(&labels(&[])));
    }

    #[test]
    fn malformed_selectors_are_refused() {
        assert_eq!("".parse::<Selector>(), Err(SelectorError::Empty));
        assert_eq!(" , ".parse::<Selector>(), Err(SelectorError::Empty));
        assert_eq!(
            "=lab".parse::<Selector>(),
            Err(SelectorError::EmptyKey("=lab".into()))
        );
        assert_eq!(
            "a=1,a=2".parse::<Selector>(),
            Err(SelectorError::Duplicate("a".into()))
        );
        assert_eq!(
            "site in (a".parse::<Selector>(),
            Err(SelectorError::Unbalanced)
        );
        assert!("site in ()".parse::<Selector>().is_err());
        assert!("two words".parse::<Selector>().is_err());
    }
}
