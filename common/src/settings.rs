//! Every setting of a config struct from a `CAPWATCH_*` environment
//! variable, by one rule instead of one flag per setting: the variable is
//! the setting's dotted name in upper case with `.` as `_` (`mock.gpus` is
//! `CAPWATCH_MOCK_GPUS`) unless the config renames it. A value is read as
//! the type of the setting's default (a number, a boolean; anything else,
//! and a setting unset by default, is a string: durations, addresses,
//! paths, names) and then checked by the config's own deserializer, so it
//! is accepted exactly as the same value in the file would be.

use std::cell::Cell;
use std::ffi::OsString;

use serde::Serialize;
use serde::de::{self, DeserializeOwned, Visitor};

/// A config's tables: `""` for the top level, then each nested table, each
/// with its field names (see [`fields`]). A top-level field named like a
/// table is that table, not a setting.
pub type Tables = [(&'static str, &'static [&'static str])];

/// The field names of struct `T`, as its `Deserialize` derive lists them.
pub fn fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let names = Cell::new(&[][..]);
    // Always an error: the deserializer only records the names.
    let _ = T::deserialize(FieldNames(&names));
    names.get()
}

/// A deserializer that records the field names a struct asks for.
struct FieldNames<'a>(&'a Cell<&'static [&'static str]>);

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("only a struct's field names are read"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0.set(fields);
        Err(de::Error::custom("only a struct's field names are read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// Every setting of `tables` and its variable: (dotted name, variable).
/// `renames` gives a setting another variable (kept from before the rule).
pub fn env_vars(tables: &Tables, renames: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = Vec::new();
    for (table, fields) in tables {
        for field in *fields {
            if table.is_empty() && tables.iter().any(|(t, _)| t == field) {
                continue;
            }
            let key = match *table {
                "" => field.to_string(),
                t => format!("{t}.{field}"),
            };
            let var = match renames.iter().find(|(k, _)| *k == key) {
                Some((_, v)) => v.to_string(),
                None => format!("CAPWATCH_{}", key.replace('.', "_").to_uppercase()),
            };
            vars.push((key, var));
        }
    }
    vars
}

/// An environment variable whose value its setting does not accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvError {
    pub var: String,
    pub message: String,
}

impl std::fmt::Display for EnvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "environment variable {}: {}", self.var, self.message)
    }
}

impl std::error::Error for EnvError {}

/// Why a binary's config could not be loaded, checked or printed: the
/// error of both `Config`s.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    #[error(transparent)]
    Env(#[from] EnvError),
    #[error("printing the configuration as TOML: {0}")]
    Print(#[from] toml::ser::Error),
}

impl ConfigError {
    /// A setting whose value is not allowed.
    pub fn invalid(setting: &'static str, reason: impl Into<String>) -> Self {
        crate::files::FileError::invalid(setting, reason).into()
    }
}

/// A config: the file at `path` (defaults without one), then each
/// setting of `vars` whose variable `lookup` finds (`std::env::var_os` in
/// the binaries). The file is parsed into `T` first, for errors that point
/// into it.
pub fn load<T>(
    path: Option<&std::path::Path>,
    vars: &[(String, String)],
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<T, ConfigError>
where
    T: Serialize + DeserializeOwned + Default,
{
    use crate::files::{FileError, parse_toml, read_text};
    let mut table = match path {
        Some(p) => {
            let text = read_text(p)?;
            parse_toml::<T>(&text, p)?;
            parse_toml::<toml::Table>(&text, p)?
        }
        None => toml::Table::new(),
    };
    apply_env::<T>(&mut table, vars, lookup)?;
    // Each value was checked alone and settings are independent, so the
    // whole deserializes; a failure here would still be named.
    table
        .try_into()
        .map_err(|e: toml::de::Error| FileError::invalid("environment", e.message()).into())
}

/// Sets in `file` (the config file's table, empty without a file) each
/// setting of `vars` whose variable `lookup` finds. `T` is the config
/// struct: its defaults give each setting's type, and each value must
/// deserialize into it alone, so an error names the variable.
pub fn apply_env<T: Serialize + DeserializeOwned + Default>(
    file: &mut toml::Table,
    vars: &[(String, String)],
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<(), EnvError> {
    // Every setting has a default that serializes; should one not, its
    // values are read as strings.
    let defaults = toml::Table::try_from(T::default()).unwrap_or_default();
    for (key, var) in vars {
        let Some(raw) = lookup(var) else { continue };
        let raw = raw.into_string().map_err(|_| EnvError {
            var: var.clone(),
            message: "not valid UTF-8".into(),
        })?;
        let value = typed(&raw, get(&defaults, key));
        let mut alone = toml::Table::new();
        insert(&mut alone, key, value.clone());
        alone.try_into::<T>().map_err(|e| EnvError {
            var: var.clone(),
            message: format!("{raw:?}: {}", e.message()),
        })?;
        insert(file, key, value);
    }
    Ok(())
}

/// `raw` as the TOML type of `default`; a string if it does not parse as
/// that (the config's deserializer then says what it expected).
fn typed(raw: &str, default: Option<&toml::Value>) -> toml::Value {
    use toml::Value;
    let parsed = match default {
        Some(Value::Integer(_)) => raw.trim().parse().ok().map(Value::Integer),
        Some(Value::Float(_)) => raw.trim().parse().ok().map(Value::Float),
        Some(Value::Boolean(_)) => raw.trim().parse().ok().map(Value::Boolean),
        _ => None,
    };
    parsed.unwrap_or_else(|| Value::String(raw.to_string()))
}

fn get<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    match key.split_once('.') {
        Some((t, rest)) => match table.get(t)? {
            toml::Value::Table(inner) => get(inner, rest),
            _ => None,
        },
        None => table.get(key),
    }
}

fn insert(table: &mut toml::Table, key: &str, value: toml::Value) {
    match key.split_once('.') {
        Some((t, rest)) => {
            let entry = table
                .entry(t)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(inner) = entry {
                insert(inner, rest, value);
            }
        }
        None => {
            table.insert(key.to_string(), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Cfg {
        name: String,
        count: u32,
        on: bool,
        path: Option<String>,
        inner: Inner,
    }

    #[derive(Debug, Default, PartialEq, Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        size: u64,
    }

    fn tables() -> [(&'static str, &'static [&'static str]); 2] {
        [("", fields::<Cfg>()), ("inner", fields::<Inner>())]
    }

    #[test]
    fn every_field_gets_a_variable_by_one_rule() {
        let vars = env_vars(&tables(), &[("path", "CAPWATCH_THE_PATH")]);
        let want = [
            ("name", "CAPWATCH_NAME"),
            ("count", "CAPWATCH_COUNT"),
            ("on", "CAPWATCH_ON"),
            ("path", "CAPWATCH_THE_PATH"),
            ("inner.size", "CAPWATCH_INNER_SIZE"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(vars, want);
    }

    #[test]
    fn values_take_the_type_of_the_default_and_errors_name_the_variable() {
        let vars = env_vars(&tables(), &[]);
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |var: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        let mut file: toml::Table = toml::from_str("count = 1\n[inner]\nsize = 2\n").unwrap();
        apply_env::<Cfg>(
            &mut file,
            &vars,
            env(&[
                ("CAPWATCH_NAME", "123"),
                ("CAPWATCH_ON", "true"),
                ("CAPWATCH_PATH", "/x"),
                ("CAPWATCH_INNER_SIZE", "9"),
            ]),
        )
        .unwrap();
        let cfg: Cfg = file.try_into().unwrap();
        assert_eq!(
            cfg,
            Cfg {
                name: "123".into(),
                count: 1,
                on: true,
                path: Some("/x".into()),
                inner: Inner { size: 9 },
            }
        );
        let err = apply_env::<Cfg>(
            &mut toml::Table::new(),
            &vars,
            env(&[("CAPWATCH_COUNT", "many")]),
        )
        .unwrap_err();
        assert_eq!(err.var, "CAPWATCH_COUNT");
        assert!(err.to_string().contains("\"many\""), "{err}");
    }
}
