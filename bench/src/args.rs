//! A tiny `--flag value` parser for the load generator's subcommands (no dependency needed).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// Flags given as `--name value` or bare `--name` (a switch).
#[derive(Debug, Default)]
pub struct Args {
    values: HashMap<String, String>,
    switches: Vec<String>,
    used: std::cell::RefCell<Vec<String>>,
}

impl Args {
    /// Parses `args`; a flag followed by another flag (or nothing) is a switch.
    pub fn parse(args: &[String]) -> Result<Args, String> {
        let mut out = Args::default();
        let mut i = 0;
        while i < args.len() {
            let a = &args[i];
            let Some(name) = a.strip_prefix("--") else {
                return Err(format!("unexpected argument {a:?}"));
            };
            if let Some((k, v)) = name.split_once('=') {
                out.values.insert(k.to_string(), v.to_string());
                i += 1;
            } else if i + 1 < args.len() && !args[i + 1].starts_with("--") {
                out.values.insert(name.to_string(), args[i + 1].clone());
                i += 2;
            } else {
                out.switches.push(name.to_string());
                i += 1;
            }
        }
        Ok(out)
    }

    fn mark(&self, name: &str) {
        self.used.borrow_mut().push(name.to_string());
    }

    /// A switch such as `--quick`.
    pub fn flag(&self, name: &str) -> bool {
        self.mark(name);
        self.switches.iter().any(|s| s == name)
    }

    /// A string value, if given.
    pub fn opt_str(&self, name: &str) -> Option<String> {
        self.mark(name);
        self.values.get(name).cloned()
    }

    /// A parsed value with a default.
    pub fn get<T: FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.opt_str(name) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("--{name}: cannot parse {v:?}")),
        }
    }

    /// A parsed value, if given.
    pub fn opt<T: FromStr>(&self, name: &str) -> Result<Option<T>, String> {
        match self.opt_str(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("--{name}: cannot parse {v:?}")),
        }
    }

    /// A parsed value that must be given.
    pub fn required<T: FromStr>(&self, name: &str) -> Result<T, String> {
        self.opt(name)?
            .ok_or_else(|| format!("--{name} is required"))
    }

    /// Seconds (fractions allowed) as a [`Duration`].
    pub fn secs(&self, name: &str, default: f64) -> Result<Duration, String> {
        let s: f64 = self.get(name, default)?;
        if !(0.0..=3600.0).contains(&s) {
            return Err(format!("--{name}: {s} s is out of range"));
        }
        Ok(Duration::from_secs_f64(s))
    }

    /// Fails on any flag that no accessor asked for (catches typos).
    pub fn finish(&self) -> Result<(), String> {
        let used = self.used.borrow();
        for k in self.values.keys().chain(self.switches.iter()) {
            if !used.iter().any(|u| u == k) {
                return Err(format!("unknown flag --{k}"));
            }
        }
        Ok(())
    }
}
