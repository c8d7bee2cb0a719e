//! The device's policy on modules, shared by `weir run` and `weir agent`: which programs
//! process modules may be, and whether containers may reach the host.

use weir_modules::ModulePolicy;

/// `--module-commands` and `--deny-module-host-access`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModulePolicyArgs {
    /// Run only process modules whose program matches one of these globs
    /// (comma-separated, e.g. /opt/weir/modules/*,python3); a pipeline with another is
    /// refused. Default: any program.
    #[arg(long, value_delimiter = ',', value_name = "GLOBS")]
    pub module_commands: Vec<String>,

    /// Refuse container modules whose create_options give them the host: Privileged,
    /// host paths in Binds or bind Mounts, the host's PID/IPC/network/UTS/user
    /// namespace, CapAdd, Devices, unconfined security options.
    #[arg(long)]
    pub deny_module_host_access: bool,
}

impl ModulePolicyArgs {
    /// The policy, or why the globs do not read.
    pub fn policy(&self) -> Result<ModulePolicy, String> {
        ModulePolicy::new(&self.module_commands, self.deny_module_host_access)
    }
}
