//! The key/value configuration a plugin receives at `init`.

use std::str::FromStr;

/// Plugin configuration from the host's config file (`[plugin.config]`).
#[derive(Debug, Default, Clone)]
pub struct Config(Vec<(String, String)>);

impl Config {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Self(pairs)
    }

    /// The raw value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// A comma-separated list under `key`, parsed; empty when unset.
    pub fn list<T: FromStr>(&self, key: &str) -> Result<Vec<T>, String> {
        let Some(raw) = self.get(key) else { return Ok(Vec::new()) };
        raw.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| format!("config {key}: cannot parse {s:?}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists() {
        let c = Config::new(vec![("pids".into(), "1, 22,".into()), ("x".into(), "a".into())]);
        assert_eq!(c.list::<u32>("pids").unwrap(), vec![1, 22]);
        assert!(c.list::<u32>("x").unwrap_err().contains("cannot parse"));
        assert!(c.list::<u32>("missing").unwrap().is_empty());
    }
}
