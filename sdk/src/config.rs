//! The plugin's configuration (`[plugin.config]` in the host's file), TOML types kept.

use crate::bindings::wasmtap::plugin::types::ConfigValue;

/// The configuration tree as the host sends it: element 0 is the root table.
#[derive(Debug, Default, Clone)]
pub struct Config {
    nodes: Vec<ConfigValue>,
}

/// One value in the tree.
#[derive(Debug, Clone, Copy)]
pub struct Value<'a> {
    nodes: &'a [ConfigValue],
    at: u32,
}

/// Conversion of a config value to a Rust type, with the key in the error.
pub trait FromConfig: Sized {
    fn from_config(value: Value<'_>) -> Option<Self>;
    /// What the error says was expected.
    const EXPECTED: &'static str;
}

impl Config {
    pub fn new(nodes: Vec<ConfigValue>) -> Self {
        Self { nodes }
    }

    /// The root table's value under `key`.
    pub fn value(&self, key: &str) -> Option<Value<'_>> {
        Value { nodes: &self.nodes, at: 0 }.get(key)
    }

    /// `key` as a `T`; `None` when unset, an error when it has another type.
    pub fn get<T: FromConfig>(&self, key: &str) -> Result<Option<T>, String> {
        self.value(key).map(|v| v.to::<T>().ok_or_else(|| format!("config {key}: expected {}", T::EXPECTED))).transpose()
    }

    /// `key` as an array of `T` (a single value counts as a one-element array); empty
    /// when unset.
    pub fn list<T: FromConfig>(&self, key: &str) -> Result<Vec<T>, String> {
        let Some(value) = self.value(key) else { return Ok(Vec::new()) };
        let items = value.items().unwrap_or_else(|| vec![value]);
        items.into_iter().map(|v| v.to::<T>().ok_or_else(|| format!("config {key}: expected an array of {}", T::EXPECTED))).collect()
    }
}

impl<'a> Value<'a> {
    fn node(&self) -> Option<&'a ConfigValue> {
        self.nodes.get(self.at as usize)
    }

    /// The value under `key`, when this is a table.
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        match self.node()? {
            ConfigValue::Table(entries) => entries.iter().find(|(k, _)| k == key).map(|&(_, at)| Value { nodes: self.nodes, at }),
            _ => None,
        }
    }

    /// The elements, when this is an array.
    pub fn items(&self) -> Option<Vec<Value<'a>>> {
        match self.node()? {
            ConfigValue::Array(items) => Some(items.iter().map(|&at| Value { nodes: self.nodes, at }).collect()),
            _ => None,
        }
    }

    pub fn to<T: FromConfig>(self) -> Option<T> {
        T::from_config(self)
    }

    pub fn as_str(&self) -> Option<&'a str> {
        match self.node()? {
            ConfigValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self.node()? {
            ConfigValue::Integer(i) => Some(*i),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match self.node()? {
            ConfigValue::Float(f) => Some(*f),
            ConfigValue::Integer(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self.node()? {
            ConfigValue::Boolean(b) => Some(*b),
            _ => None,
        }
    }
}

impl FromConfig for String {
    const EXPECTED: &'static str = "a string";
    fn from_config(value: Value<'_>) -> Option<Self> {
        value.as_str().map(str::to_owned)
    }
}

impl FromConfig for bool {
    const EXPECTED: &'static str = "a boolean";
    fn from_config(value: Value<'_>) -> Option<Self> {
        value.as_bool()
    }
}

impl FromConfig for f64 {
    const EXPECTED: &'static str = "a number";
    fn from_config(value: Value<'_>) -> Option<Self> {
        value.as_f64()
    }
}

macro_rules! integers {
    ($($t:ty),*) => {$(
        impl FromConfig for $t {
            const EXPECTED: &'static str = concat!("an integer that fits ", stringify!($t));
            fn from_config(value: Value<'_>) -> Option<Self> {
                value.as_i64().and_then(|i| <$t>::try_from(i).ok())
            }
        }
    )*};
}
integers!(u16, u32, u64, i32, i64, usize);

#[cfg(test)]
mod tests {
    use super::*;
    use ConfigValue::*;

    #[test]
    fn reads_typed_values() {
        // { mode = "fast", n = 3, pids = [1, 2], on = true, sub = { x = 1.5 } }
        let c = Config::new(vec![
            Table(vec![("mode".into(), 1), ("n".into(), 2), ("pids".into(), 3), ("on".into(), 6), ("sub".into(), 7)]),
            String("fast".into()),
            Integer(3),
            Array(vec![4, 5]),
            Integer(1),
            Integer(2),
            Boolean(true),
            Table(vec![("x".into(), 8)]),
            Float(1.5),
        ]);
        assert_eq!(c.get::<std::string::String>("mode").unwrap().as_deref(), Some("fast"));
        assert_eq!(c.get::<u32>("n").unwrap(), Some(3));
        assert_eq!(c.list::<u32>("pids").unwrap(), vec![1, 2]);
        assert_eq!(c.list::<u32>("n").unwrap(), vec![3], "a single value is a one-element list");
        assert_eq!(c.get::<bool>("on").unwrap(), Some(true));
        assert_eq!(c.value("sub").and_then(|s| s.get("x")).and_then(|x| x.as_f64()), Some(1.5));
        assert!(c.get::<u32>("mode").unwrap_err().contains("expected an integer"));
        assert!(c.list::<u32>("missing").unwrap().is_empty());
        assert_eq!(c.get::<bool>("missing").unwrap(), None);
    }
}
