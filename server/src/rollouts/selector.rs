//! Label selectors: `site=lab,arch=x86_64` matches devices whose labels have every pair.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Why a selector was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("selector is empty; write key=value pairs separated by commas")]
    Empty,
    #[error("selector term {0:?} is not key=value")]
    NotAPair(String),
    #[error("selector term {0:?} has an empty key")]
    EmptyKey(String),
    #[error("selector names label {0:?} twice")]
    Duplicate(String),
}

/// A conjunction of `key=value` terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    terms: BTreeMap<String, String>,
}

impl Selector {
    /// Whether every term is among `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut terms = BTreeMap::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (key, value) = term
                .split_once('=')
                .ok_or_else(|| SelectorError::NotAPair(term.to_owned()))?;
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() {
                return Err(SelectorError::EmptyKey(term.to_owned()));
            }
            if terms.insert(key.to_owned(), value.to_owned()).is_some() {
                return Err(SelectorError::Duplicate(key.to_owned()));
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
        for (ix, (key, value)) in self.terms.iter().enumerate() {
            if ix > 0 {
                f.write_str(",")?;
            }
            write!(f, "{key}={value}")?;
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
    fn an_empty_value_matches_an_empty_label() {
        let sel: Selector = "tier=".parse().unwrap();
        assert!(sel.matches(&labels(&[("tier", "")])));
        assert!(!sel.matches(&labels(&[])));
    }

    #[test]
    fn display_is_canonical() {
        let sel: Selector = " b=2 ,a=1,".parse().unwrap();
        assert_eq!(sel.to_string(), "a=1,b=2");
    }

    #[test]
    fn malformed_selectors_are_refused() {
        assert_eq!("".parse::<Selector>(), Err(SelectorError::Empty));
        assert_eq!(" , ".parse::<Selector>(), Err(SelectorError::Empty));
        assert_eq!(
            "site".parse::<Selector>(),
            Err(SelectorError::NotAPair("site".into()))
        );
        assert_eq!(
            "=lab".parse::<Selector>(),
            Err(SelectorError::EmptyKey("=lab".into()))
        );
        assert_eq!(
            "a=1,a=2".parse::<Selector>(),
            Err(SelectorError::Duplicate("a".into()))
        );
    }
}
