//! `weir-hub`: runs the hub (`serve`), and administers one from the command line
//! (`devices`, `deployments`, `status`, `token`).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use weir_hub::data::FleetLocation;
use weir_hub::identity::{DeviceKey, device_resource, sign_token};
use weir_hub::limits::{RequestLimits, StreamRule};
use weir_hub::protocol::{DeploymentSpec, DevicePatch, NewDevice, PipelineDocument, Rollout};
use weir_hub::store::Database;
use weir_hub::{ClientError, Credentials, Hub, HubClient, HubConfig, SecretSource, TlsFiles};

#[derive(Parser)]
#[command(
    name = "weir-hub",
    version,
    about = "Weir's hub: devices, identities and deployments"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the hub.
    Serve(Box<ServeArgs>),
    /// Registers, lists, tags and removes devices.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Writes, lists and removes deployments.
    #[command(subcommand)]
    Deployments(DeploymentsCommand),
    /// Shows the fleet at a glance: devices by connection, deployments by rollout.
    Status(AdminArgs),
    /// Runs read-only SQL over the data the fleet shipped, or with --device on a connected
    /// device's retained streams.
    ///
    /// Each shipping (pipeline, sink) is a table "pipeline"."sink" (and sink when unique)
    /// with hub_device and hub_arrived_at columns. With --device the device's agent runs
    /// the query on its local API; a device that is not connected, or does not answer
    /// within the query's timeout, is an error. The answer prints as a table, or as JSON,
    /// CSV or Arrow IPC with --format.
    Query(QueryArgs),
    /// Prints a device token for a device id and key (for curl, or a device of your own).
    Token {
        /// The device id.
        #[arg(long)]
        device: String,
        /// One of the device's keys, base64.
        #[arg(long, env = "WEIR_DEVICE_KEY", hide_env_values = true)]
        key: String,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = positive_duration)]
        ttl: Duration,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Where the hub keeps its SQLite database and its secret.
    #[arg(long, env = "WEIR_HUB_DATA_DIR", default_value = "weir-hub-data")]
    data_dir: PathBuf,
    /// A PostgreSQL URL (postgres://user:password@host/db) instead of SQLite.
    #[arg(long, env = "WEIR_HUB_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// The address to listen on.
    #[arg(long, env = "WEIR_HUB_LISTEN", default_value = "127.0.0.1:8700")]
    listen: SocketAddr,
    /// A PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The admin token. Without it, one is generated on first start and printed once.
    #[arg(long, env = "WEIR_HUB_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// The file holding the secret device keys are derived from (default:
    /// DATA_DIR/hub.secret, created when missing). Hubs sharing a database need the same.
    #[arg(long, conflicts_with = "secret")]
    secret_file: Option<PathBuf>,
    /// The secret itself, base64 (32 bytes), instead of a file.
    #[arg(long, env = "WEIR_HUB_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// How often to look for changes other hubs made to a shared database.
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    sync_interval: Duration,
    /// A device not heard from for this long is offline.
    #[arg(long, default_value = "90s", value_parser = positive_duration)]
    offline_after: Duration,
    /// The longest a device's poll for its desired state is held.
    #[arg(long, default_value = "60s", value_parser = positive_duration)]
    max_poll_wait: Duration,
    /// Where the data devices ship is stored: a directory (default DATA_DIR/fleet) or an
    /// S3-compatible bucket, s3://BUCKET/PREFIX. S3 credentials, region and endpoint come
    /// from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_ENDPOINT_URL
    /// (AWS_ALLOW_HTTP=true for a plain-HTTP endpoint).
    #[arg(long, env = "WEIR_HUB_FLEET_DATA", value_name = "LOCATION")]
    fleet_data: Option<FleetLocation>,
    /// The longest a query over the fleet's data may run.
    #[arg(long, default_value = "30s", value_parser = positive_duration, value_name = "DURATION")]
    query_timeout: Duration,
    /// The most rows a query over the fleet's data answers with; the answer says when
    /// it was cut.
    #[arg(long, default_value_t = weir_query::Limits::DEFAULT_MAX_ROWS, value_name = "ROWS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    query_max_rows: usize,
    /// Batches (up to 64 MiB each) read and stored at once; more get 429.
    #[arg(long, default_value_t = RequestLimits::default().max_concurrent_ingest, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_concurrent_ingest: usize,
    /// Long polls of each kind (desired state, queries) one device may hold; more get 429.
    #[arg(long, default_value_t = RequestLimits::default().max_polls_per_device, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_polls_per_device: usize,
    /// Reports one device may send a minute (bursts of 10 pass); more get 429.
    #[arg(long, default_value_t = RequestLimits::default().reports_per_minute, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    reports_per_minute: u32,
    /// Streams (pipeline/sink) one device may ship to; a batch to one more gets 422.
    #[arg(long, default_value_t = RequestLimits::default().max_streams_per_device, value_name = "N",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_streams_per_device: usize,
    /// The streams devices may ship to, comma-separated: `deployed` (the hub sinks of the
    /// device's deployment, and streams it shipped to before) and PIPELINE/SINK globs.
    /// The default takes any stream.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "*/*",
        value_name = "RULES"
    )]
    accept_streams: Vec<StreamRule>,
    /// Bytes one device may ship a day (UTC), e.g. 4GiB; past it, 429 until the next day.
    #[arg(long, default_value = "4GiB", value_parser = byte_size, value_name = "SIZE")]
    max_bytes_per_device_day: u64,
}

/// A size such as `4GiB` or `500MB`.
fn byte_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("'{text}' is not a size: write e.g. 4GiB or 500MB"))
}

#[derive(Args, Clone)]
struct AdminArgs {
    /// The hub's URL.
    #[arg(long, env = "WEIR_HUB_URL", default_value = "http://127.0.0.1:8700")]
    hub: String,
    /// The admin token.
    #[arg(long, env = "WEIR_HUB_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A PEM CA certificate to trust for an HTTPS hub (beside the system's roots).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Accept a plain `http://` hub that is not on this machine. Without it such a URL
    /// is refused: the admin token would cross the network unencrypted.
    #[arg(long)]
    insecure_http: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct QueryArgs {
    #[command(flatten)]
    admin: AdminArgs,
    /// Ask this device about its retained streams instead of the fleet's stored data.
    #[arg(long, value_name = "ID")]
    device: Option<String>,
    /// One SELECT.
    #[arg(value_name = "SQL")]
    sql: String,
    /// How to print the answer: table, json, csv or arrow.
    #[arg(long, default_value = "table")]
    format: String,
    /// Answer with at most this many rows (at most the device's own limit).
    #[arg(long, value_name = "ROWS")]
    max_rows: Option<usize>,
    /// Give up after this long, e.g. 5s (at most the device's own limit).
    #[arg(long, value_name = "DURATION")]
    timeout: Option<String>,
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Lists devices.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only devices matching this target condition, e.g. "site = 'plant-3'".
        #[arg(long = "where")]
        condition: Option<String>,
        /// Only devices with this tag: NAME=VALUE, or NAME for any value.
        #[arg(long)]
        tag: Option<String>,
    },
    /// Registers a device and prints its keys.
    Create {
        #[command(flatten)]
        admin: AdminArgs,
        /// The device id.
        id: String,
        /// A tag, NAME=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Shows one device: tags, connection, desired deployment, last report.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        /// The device id.
        id: String,
    },
    /// Sets tags (NAME=VALUE) and removes them (--remove NAME).
    Tag {
        #[command(flatten)]
        admin: AdminArgs,
        /// The device id.
        id: String,
        /// Tags to set, NAME=VALUE.
        #[arg(value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Tags to remove.
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Prints a device's keys.
    Keys {
        #[command(flatten)]
        admin: AdminArgs,
        /// The device id.
        id: String,
    },
    /// Replaces one of a device's keys: tokens signed with the old one stop working.
    RotateKey {
        #[command(flatten)]
        admin: AdminArgs,
        /// The device id.
        id: String,
        /// primary or secondary.
        slot: String,
    },
    /// Refuses the device's requests until enabled again.
    Disable {
        #[command(flatten)]
        admin: AdminArgs,
        /// The device id.
        id: String,
    },
    /// Lets a disabled device connect again.
    Enable {
        #[command(flatten)]
        admin: AdminArgs,
        /// The device id.
        id: String,
    },
    /// Removes a device.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        /// The device id.
        id: String,
    },
}

#[derive(Subcommand)]
enum DeploymentsCommand {
    /// Lists deployments with their rollout counts.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Shows one deployment.
    Show {
        #[command(flatten)]
        admin: AdminArgs,
        /// The deployment.
        name: String,
    },
    /// Creates or updates a deployment from pipeline files.
    Apply {
        #[command(flatten)]
        admin: AdminArgs,
        /// The deployment.
        name: String,
        /// Which devices: a condition over their tags, e.g. "site = 'plant-3'".
        #[arg(long)]
        target: String,
        /// Higher wins where deployments overlap.
        #[arg(long, default_value_t = 0)]
        priority: i64,
        /// The pipeline files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Lists the devices a deployment targets, with their reports.
    Devices {
        #[command(flatten)]
        admin: AdminArgs,
        /// The deployment.
        name: String,
    },
    /// Removes a deployment: its devices move to the next one that matches them.
    Delete {
        #[command(flatten)]
        admin: AdminArgs,
        /// The deployment.
        name: String,
    },
}

async fn query(args: QueryArgs) -> anyhow::Result<()> {
    let table = args.format == "table" && !args.admin.json;
    let format = if table {
        weir_query::Format::Arrow
    } else if args.admin.json {
        weir_query::Format::Json
    } else {
        args.format
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?
    };
    let request = weir_query::QueryRequest {
        sql: args.sql,
        format: Some(format),
        max_rows: args.max_rows,
        timeout: args.timeout,
    };
    let client = client(&args.admin)?;
    let answer = match &args.device {
        Some(device) => client.query_device(device, &request).await?,
        None => client.query(&request).await?,
    };
    if table {
        let (table, rows) = weir_query::arrow_to_table(&answer.body).map_err(anyhow::Error::msg)?;
        println!(
            "{table}\n({rows} {})",
            if rows == 1 { "row" } else { "rows" }
        );
    } else {
        use std::io::Write;
        std::io::stdout().write_all(&answer.body)?;
    }
    if answer.truncated {
        eprintln!(
            "weir-hub query: the answer was cut at the device's row limit; narrow the query \
             or raise --max-rows"
        );
    }
    Ok(())
}

/// A duration that must not be zero (an interval, a wait, a lifetime).
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if duration.is_zero() => Err("must be longer than zero".to_owned()),
        Ok(duration) => Ok(duration),
        Err(e) => Err(format!("{e}; write e.g. 500ms, 10s or 1m")),
    }
}

fn parse_tag(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err(format!("'{text}' is not a tag: write NAME=VALUE")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(ClientError::Refused { diagnostics, .. }) = e.downcast_ref() {
                for diagnostic in diagnostics {
                    eprintln!("{}", diagnostic.text);
                }
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::Devices(command) => devices(command).await,
        Command::Deployments(command) => deployments(command).await,
        Command::Query(args) => query(args).await,
        Command::Status(admin) => {
            let status = client(&admin)?.status().await?;
            if admin.json {
                return print_json(&status);
            }
            println!(
                "devices: {} ({} online, {} offline, {} never seen)",
                status.devices, status.online, status.offline, status.never_seen
            );
            print_table(
                &ROLLOUT_HEADER,
                status
                    .deployments
                    .iter()
                    .map(|d| rollout_row(&d.name, d.version, d.priority, &d.status, &d.rollout)),
            );
            Ok(())
        }
        Command::Token { device, key, ttl } => {
            let key = DeviceKey::from_base64(&key)?;
            let expiry = weir_hub::protocol::now_secs() + ttl.as_secs();
            println!("{}", sign_token(&device_resource(&device), &key, expiry));
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = HubConfig::new(&args.data_dir);
    config.database = Database::choose(args.database.as_deref(), &args.data_dir);
    config.admin_token = args.admin_token;
    config.secret = match (args.secret, args.secret_file) {
        (Some(secret), _) => SecretSource::Value(secret),
        (None, Some(file)) => SecretSource::File(file),
        (None, None) => SecretSource::File(args.data_dir.join("hub.secret")),
    };
    config.sync_interval = args.sync_interval;
    config.offline_after = args.offline_after;
    config.max_poll_wait = args.max_poll_wait;
    if let Some(location) = args.fleet_data {
        config.fleet_data = location;
    }
    config.query_limits = weir_query::Limits {
        timeout: args.query_timeout,
        max_rows: args.query_max_rows,
        ..weir_query::Limits::default()
    };
    config.limits = RequestLimits {
        max_concurrent_ingest: args.max_concurrent_ingest,
        max_polls_per_device: args.max_polls_per_device,
        reports_per_minute: args.reports_per_minute,
        max_streams_per_device: args.max_streams_per_device,
        max_bytes_per_device_day: args.max_bytes_per_device_day,
    };
    config.accept_streams = args.accept_streams;
    let database = config.database.describe();
    let fleet_data = config.fleet_data.to_string();
    let opened = Hub::open(config).await?;
    if opened.created_secret {
        tracing::info!("created the hub's secret in {}", args.data_dir.display());
    }
    if let Some(token) = &opened.generated_admin_token {
        // Printed, not logged: log files outlive terminals.
        eprintln!(
            "\nThe admin token (shown once; the hub keeps only its hash):\n\n    {token}\n\n\
             Pass it as --token or WEIR_HUB_ADMIN_TOKEN to the weir-hub commands.\n"
        );
    }
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
        _ => None,
    };
    let mut running = weir_hub::serve(opened.hub, args.listen, tls.as_ref()).await?;
    tracing::info!(url = %running.url(), %database, fleet_data = %fleet_data, "weir-hub is serving");
    tokio::select! {
        result = running.wait() => result.context("the server stopped")?,
        _ = shutdown_signal() => tracing::info!("stopping"),
    }
    running.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn client(admin: &AdminArgs) -> anyhow::Result<HubClient> {
    let Some(token) = admin.token.clone() else {
        bail!("the admin API needs the admin token: pass --token or set WEIR_HUB_ADMIN_TOKEN");
    };
    Ok(HubClient::with_transport(
        &admin.hub,
        Credentials::Admin(token),
        admin.ca_file.as_deref(),
        admin.insecure_http,
    )?)
}

async fn devices(command: DevicesCommand) -> anyhow::Result<()> {
    match command {
        DevicesCommand::List {
            admin,
            condition,
            tag,
        } => {
            let devices = client(&admin)?
                .devices(condition.as_deref(), tag.as_deref())
                .await?;
            if admin.json {
                return print_json(&devices);
            }
            print_table(
                &["DEVICE", "CONNECTION", "DESIRED", "REPORTED", "TAGS"],
                devices.iter().map(|d| {
                    vec![
                        d.id.clone(),
                        d.connection.as_str().to_owned(),
                        d.desired.as_ref().map_or_else(
                            || "-".to_owned(),
                            |r| format!("{} v{}", r.name, r.version),
                        ),
                        d.report.as_ref().map_or_else(
                            || "-".to_owned(),
                            |r| format!("{:?}", r.status).to_lowercase(),
                        ),
                        format_tags(&d.tags),
                    ]
                }),
            );
            Ok(())
        }
        DevicesCommand::Create { admin, id, tags } => {
            let created = client(&admin)?
                .create_device(&NewDevice {
                    id,
                    tags: tags.into_iter().collect(),
                })
                .await?;
            if admin.json {
                return print_json(&created);
            }
            println!("registered device '{}'", created.device.id);
            println!("primary key:   {}", created.keys.primary);
            println!("secondary key: {}", created.keys.secondary);
            Ok(())
        }
        DevicesCommand::Show { admin, id } => {
            let device = client(&admin)?.device(&id).await?;
            print_json(&device)
        }
        DevicesCommand::Tag {
            admin,
            id,
            tags,
            remove,
        } => {
            let mut changes: BTreeMap<String, Option<String>> =
                tags.into_iter().map(|(k, v)| (k, Some(v))).collect();
            changes.extend(remove.into_iter().map(|name| (name, None)));
            let patch = DevicePatch {
                tags: Some(changes),
                enabled: None,
            };
            let device = client(&admin)?.patch_device(&id, &patch).await?;
            println!("{}: {}", device.id, format_tags(&device.tags));
            Ok(())
        }
        DevicesCommand::Keys { admin, id } => {
            let keys = client(&admin)?.device_keys(&id).await?;
            print_json(&keys)
        }
        DevicesCommand::RotateKey { admin, id, slot } => {
            let keys = client(&admin)?.rotate_key(&id, &slot).await?;
            print_json(&keys)
        }
        DevicesCommand::Disable { admin, id } => set_enabled(&admin, &id, false).await,
        DevicesCommand::Enable { admin, id } => set_enabled(&admin, &id, true).await,
        DevicesCommand::Delete { admin, id } => {
            client(&admin)?.delete_device(&id).await?;
            println!("deleted device '{id}'");
            Ok(())
        }
    }
}

async fn set_enabled(admin: &AdminArgs, id: &str, enabled: bool) -> anyhow::Result<()> {
    let patch = DevicePatch {
        tags: None,
        enabled: Some(enabled),
    };
    client(admin)?.patch_device(id, &patch).await?;
    println!(
        "device '{id}' is {}",
        if enabled { "enabled" } else { "disabled" }
    );
    Ok(())
}

async fn deployments(command: DeploymentsCommand) -> anyhow::Result<()> {
    match command {
        DeploymentsCommand::List { admin } => {
            let deployments = client(&admin)?.deployments().await?;
            if admin.json {
                return print_json(&deployments);
            }
            let header: Vec<&str> = ROLLOUT_HEADER.iter().copied().chain(["TARGET"]).collect();
            print_table(
                &header,
                deployments.iter().map(|d| {
                    let mut row =
                        rollout_row(&d.name, d.version, d.priority, &d.status, &d.rollout);
                    row.push(d.target_condition.clone());
                    row
                }),
            );
            Ok(())
        }
        DeploymentsCommand::Show { admin, name } => {
            print_json(&client(&admin)?.deployment(&name).await?)
        }
        DeploymentsCommand::Apply {
            admin,
            name,
            target,
            priority,
            files,
        } => {
            let mut pipelines = Vec::new();
            for file in &files {
                let yaml = std::fs::read_to_string(file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let Some(stem) = file.file_stem().and_then(|s| s.to_str()) else {
                    bail!("{} has no usable file name", file.display());
                };
                pipelines.push(PipelineDocument {
                    name: stem.to_owned(),
                    yaml,
                });
            }
            let spec = DeploymentSpec {
                name: Some(name.clone()),
                target_condition: target,
                priority,
                pipelines,
            };
            let view = client(&admin)?.put_deployment(&name, &spec).await?;
            if admin.json {
                return print_json(&view);
            }
            println!(
                "deployment '{}' is at version {} (revision {}), targeting {} device{}",
                view.name,
                view.version,
                view.revision,
                view.rollout.targeted,
                if view.rollout.targeted == 1 { "" } else { "s" }
            );
            Ok(())
        }
        DeploymentsCommand::Devices { admin, name } => {
            let devices = client(&admin)?.deployment_devices(&name).await?;
            if admin.json {
                return print_json(&devices);
            }
            print_table(
                &["DEVICE", "CONNECTION", "REPORTED", "ERROR"],
                devices.iter().map(|d| {
                    vec![
                        d.id.clone(),
                        d.connection.as_str().to_owned(),
                        d.report.as_ref().map_or_else(
                            || "-".to_owned(),
                            |r| format!("{:?}", r.status).to_lowercase(),
                        ),
                        d.report
                            .as_ref()
                            .and_then(|r| r.error.clone())
                            .unwrap_or_default(),
                    ]
                }),
            );
            Ok(())
        }
        DeploymentsCommand::Delete { admin, name } => {
            client(&admin)?.delete_deployment(&name).await?;
            println!("deleted deployment '{name}'");
            Ok(())
        }
    }
}

/// The columns of a deployment's rollout, in `status` and `deployments list`.
const ROLLOUT_HEADER: [&str; 8] = [
    "DEPLOYMENT",
    "VERSION",
    "PRIORITY",
    "STATUS",
    "TARGETED",
    "APPLIED",
    "OK",
    "FAILED",
];

fn rollout_row(
    name: &str,
    version: u64,
    priority: i64,
    status: &str,
    rollout: &Rollout,
) -> Vec<String> {
    vec![
        name.to_owned(),
        version.to_string(),
        priority.to_string(),
        status.to_owned(),
        rollout.targeted.to_string(),
        rollout.applied.to_string(),
        rollout.succeeded.to_string(),
        rollout.failed.to_string(),
    ]
}

fn format_tags(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints rows under a header, columns padded to their widest cell.
fn print_table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row);
    }
}
