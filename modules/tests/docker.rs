//! The Docker runtime against a real engine.
//!
//! There is no registry here and no images: each test compiles a tiny static C program
//! (`gcc -static`), builds a `FROM scratch` image around it with the classic builder,
//! runs it in the mode it needs, and removes its containers and image at the end (also
//! when it fails: the fixture cleans up on drop). Every test is bounded by a timeout.
//!
//! The program's modes: `sleep` (a line to stdout, one to stderr, then wait for SIGTERM
//! and exit 0), `exit N`, `eat` (allocate memory until the OOM killer comes) and `touch`
//! (create `/run/weir/hello`).

use std::time::{Duration, Instant};

use futures::StreamExt;
use weir_modules::error::RuntimeError;
use weir_modules::runtime::{
    ContainerRuntime, Limits, LogStream, Program, RuntimeEvent, RuntimeHealth,
};

use support::Fixture;

mod support {
    //! Builds the test image, names things uniquely, and cleans up.

    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use bollard::Docker;
    use bollard::query_parameters::{
        BuildImageOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
    };
    use futures::StreamExt;
    use weir_modules::runtime::{DockerRuntime, LaunchSpec, Limits, Program, Transport};

    /// The test program (see the file's docs).
    const PROGRAM: &str = r#"
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t stop = 0;
static void on_term(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "sleep";
    if (strcmp(mode, "sleep") == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_term;
        sigaction(SIGTERM, &sa, NULL);
        printf("hello from stdout\n");
        fflush(stdout);
        fprintf(stderr, "hello from stderr\n");
        while (!stop) pause();
        printf("got SIGTERM\n");
        fflush(stdout);
        return 0;
    }
    if (strcmp(mode, "exit") == 0) return argc > 2 ? atoi(argv[2]) : 0;
    if (strcmp(mode, "eat") == 0) {
        for (;;) {
            char *p = malloc(1 << 20);
            if (p) memset(p, 1, 1 << 20);
        }
    }
    if (strcmp(mode, "touch") == 0) {
        int fd = open("/run/weir/hello", O_CREAT | O_WRONLY | O_TRUNC, 0644);
        if (fd < 0) { perror("open /run/weir/hello"); return 1; }
        if (write(fd, "hi\n", 3) != 3) return 1;
        close(fd);
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
"#;

    const DOCKERFILE: &str = "FROM scratch\nCOPY prog /prog\nENTRYPOINT [\"/prog\"]\n";

    /// A name part unique to this run and call: process id, time, counter.
    pub fn unique() -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |now| now.subsec_nanos());
        format!(
            "{}-{nanos:x}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The compiled test program (compiled once per test binary).
    fn program() -> &'static Path {
        static PROGRAM_PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
        let (_, path) = PROGRAM_PATH.get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let source = dir.path().join("prog.c");
            std::fs::write(&source, PROGRAM).expect("write prog.c");
            let binary = dir.path().join("prog");
            let output = std::process::Command::new("gcc")
                .args(["-static", "-O2", "-o"])
                .arg(&binary)
                .arg(&source)
                .output()
                .expect("run gcc (the Docker tests need gcc and a static libc)");
            assert!(
                output.status.success(),
                "gcc failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            (dir, binary)
        });
        path
    }

    /// A build context: the Dockerfile and the program, as a tar archive.
    fn build_context() -> Vec<u8> {
        let binary = std::fs::read(program()).expect("read the test program");
        let mut tar = tar::Builder::new(Vec::new());
        for (name, mode, data) in [
            ("Dockerfile", 0o644, DOCKERFILE.as_bytes()),
            ("prog", 0o755, &binary[..]),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(mode);
            header.set_cksum();
            tar.append_data(&mut header, name, data).expect("tar entry");
        }
        tar.into_inner().expect("tar archive")
    }

    /// Builds the test image as `tag` (classic builder: no BuildKit session needed).
    pub async fn build_image(docker: &Docker, tag: &str) {
        // No build cache: a cached build reuses the intermediate images of another
        // test's build, and that test removing its image pulls them from under this
        // build ("failed to get digest ... no such file or directory").
        let options = BuildImageOptionsBuilder::default()
            .t(tag)
            .nocache(true)
            .rm(true)
            .forcerm(true)
            .build();
        let body = bollard::body_full(build_context().into());
        let mut progress = docker.build_image(options, None, Some(body));
        while let Some(step) = progress.next().await {
            if let Err(e) = step {
                panic!("building the test image {tag} failed: {e}");
            }
        }
    }

    /// One test's image, runtime and module directories; removes its containers and
    /// image when dropped.
    pub struct Fixture {
        pub runtime: DockerRuntime,
        pub image: String,
        pub dir: tempfile::TempDir,
        names: std::sync::Mutex<Vec<String>>,
    }

    impl Fixture {
        /// Connects and builds this test's image.
        pub async fn new(test: &str) -> Fixture {
            let runtime = DockerRuntime::connect()
                .await
                .expect("the Docker tests need a Docker engine");
            let image = format!("weir-test-{test}:{}", unique());
            within(
                Duration::from_secs(60),
                build_image(runtime.client(), &image),
            )
            .await;
            Fixture {
                runtime,
                image,
                dir: tempfile::tempdir().expect("temp dir"),
                names: std::sync::Mutex::new(Vec::new()),
            }
        }

        /// A launch spec running the test program with `args`, under a fresh container
        /// name (removed at the end).
        pub fn spec(&self, role: &str, args: &[&str]) -> LaunchSpec {
            let name = format!("weir-test-{role}-{}", unique());
            self.names.lock().unwrap().push(name.clone());
            LaunchSpec {
                name: name.clone(),
                module: role.to_owned(),
                program: Program::Image {
                    image: self.image.clone(),
                    archive: None,
                    command: Some(args.iter().map(|arg| (*arg).to_owned()).collect()),
                },
                env: BTreeMap::from([("TEST_VAR".to_owned(), "from-spec".to_owned())]),
                transport: Transport::Unix,
                socket_dir: self.dir.path().join(&name),
                role: "transform",
                limits: Limits::default(),
                create_options: serde_json::Map::new(),
                labels: BTreeMap::from([("weir.test".to_owned(), role.to_owned())]),
            }
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let names = std::mem::take(&mut *self.names.lock().unwrap());
            let image = self.image.clone();
            // Drop cannot await, and the test's runtime may be gone or busy: clean up on
            // a thread of its own, with a runtime and a connection of its own.
            let cleanup = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cleanup runtime");
                runtime.block_on(async move {
                    let Ok(connected) = DockerRuntime::connect().await else {
                        return;
                    };
                    let docker = connected.client();
                    for name in names {
                        let options = RemoveContainerOptionsBuilder::default()
                            .force(true)
                            .v(true)
                            .build();
                        let _ = docker.remove_container(&name, Some(options)).await;
                    }
                    let options = RemoveImageOptionsBuilder::default().force(true).build();
                    let _ = docker.remove_image(&image, Some(options), None).await;
                });
            });
            let _ = cleanup.join();
        }
    }

    /// Runs `test` with a time limit, so a hung engine call fails the test instead of
    /// hanging the run.
    pub async fn within<T>(limit: Duration, test: impl Future<Output = T>) -> T {
        match tokio::time::timeout(limit, test).await {
            Ok(value) => value,
            Err(_) => panic!("the test did not finish within {limit:?}"),
        }
    }
}

/// A generous bound for one test: image build, a container or two, and their ends.
const TEST_LIMIT: Duration = Duration::from_secs(120);

/// The next item of a stream, which must come within `limit`.
async fn next_within<S: futures::Stream + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Option<S::Item> {
    tokio::time::timeout(limit, stream.next())
        .await
        .unwrap_or_else(|_| panic!("nothing came on the stream within {limit:?}"))
}

#[tokio::test]
async fn a_container_runs_logs_stops_and_is_removed() {
    let fx = Fixture::new("lifecycle").await;
    support::within(TEST_LIMIT, async {
        let runtime = &fx.runtime;
        assert_eq!(runtime.kind(), "docker");
        let spec = fx.spec("lifecycle", &["sleep"]);
        runtime.prepare(&spec).await.expect("prepare");
        let id = runtime.create(&spec).await.expect("create");
        runtime.start(&id).await.expect("start");

        let state = runtime.inspect(&id).await.expect("inspect");
        assert!(state.running, "{state:?}");
        assert_eq!(state.exit, None);
        assert_eq!(state.health, None);

        // Both lines, each from its own stream.
        let mut logs = runtime.logs(&id);
        let mut lines = Vec::new();
        while lines.len() < 2 {
            let line = next_within(&mut logs, Duration::from_secs(20))
                .await
                .expect("the logs ended early")
                .expect("a log line");
            lines.push((line.stream, line.line));
        }
        lines.sort_by_key(|(stream, _)| *stream == LogStream::Stderr);
        assert_eq!(
            lines,
            vec![
                (LogStream::Stdout, "hello from stdout".to_owned()),
                (LogStream::Stderr, "hello from stderr".to_owned()),
            ]
        );

        // The program exits at SIGTERM, well within the grace period.
        let started = Instant::now();
        runtime
            .stop(&id, Duration::from_millis(9_500))
            .await
            .expect("stop");
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "stop waited for the grace period: {:?}",
            started.elapsed()
        );
        let exit = runtime.wait(&id).await.expect("wait");
        assert_eq!(exit.code, Some(0), "{exit:?}");
        assert!(exit.is_success(), "{exit:?}");

        // The logs follow the container to its end, then end.
        let mut rest = Vec::new();
        while let Some(line) = next_within(&mut logs, Duration::from_secs(20)).await {
            rest.push(line.expect("a log line").line);
        }
        assert_eq!(rest, vec!["got SIGTERM".to_owned()]);

        let state = runtime.inspect(&id).await.expect("inspect after the end");
        assert!(!state.running);
        assert_eq!(state.exit.as_ref().and_then(|exit| exit.code), Some(0));

        // Stopping what has ended is not an error; removing twice is not either.
        runtime
            .stop(&id, Duration::from_secs(1))
            .await
            .expect("stop an ended container");
        runtime.remove(&id).await.expect("remove");
        runtime.remove(&id).await.expect("remove again");
        match runtime.inspect(&id).await {
            Err(RuntimeError::NoSuchInstance(gone)) => assert_eq!(gone, id.0),
            other => panic!("inspect after remove: {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn an_exit_code_is_reported_and_leftovers_are_replaced() {
    let fx = Fixture::new("exit").await;
    support::within(TEST_LIMIT, async {
        let runtime = &fx.runtime;
        let spec = fx.spec("exit", &["exit", "3"]);
        // A container left over with the module's name (a crashed Weir) is replaced.
        let leftover = runtime.create(&spec).await.expect("create the leftover");
        let id = runtime
            .create(&spec)
            .await
            .expect("create over the leftover");
        assert_ne!(leftover, id);
        assert!(matches!(
            runtime.inspect(&leftover).await,
            Err(RuntimeError::NoSuchInstance(_))
        ));

        let mut events = runtime.events(&id);
        runtime.start(&id).await.expect("start");
        let exit = runtime.wait(&id).await.expect("wait");
        assert_eq!(exit.code, Some(3), "{exit:?}");
        assert_eq!(exit.signal, None);
        assert!(!exit.oom_killed);
        assert!(!exit.is_success());
        assert_eq!(exit.to_string(), "exited with code 3");

        let mut seen = Vec::new();
        while let Some(event) = next_within(&mut events, Duration::from_secs(20)).await {
            seen.push(event);
        }
        assert_eq!(seen.first(), Some(&RuntimeEvent::Started), "{seen:?}");
        match seen.last() {
            Some(RuntimeEvent::Exited(exit)) => assert_eq!(exit.code, Some(3)),
            other => panic!("the events did not end with the exit: {other:?} in {seen:?}"),
        }
        runtime.remove(&id).await.expect("remove");
    })
    .await;
}

#[tokio::test]
async fn a_missing_image_is_named_and_an_archive_loads_it() {
    let fx = Fixture::new("archive").await;
    support::within(TEST_LIMIT, async {
        let runtime = &fx.runtime;

        let mut missing = fx.spec("missing", &["sleep"]);
        let absent = format!("weir-test-absent:{}", support::unique());
        missing.program = Program::Image {
            image: absent.clone(),
            archive: None,
            command: None,
        };
        match runtime.prepare(&missing).await {
            Err(error @ RuntimeError::ImageMissing { .. }) => {
                assert!(error.to_string().contains(&absent), "{error}");
            }
            other => panic!("prepare without the image: {other:?}"),
        }
        // Creating it anyway says the same.
        assert!(matches!(
            runtime.create(&missing).await,
            Err(RuntimeError::ImageMissing { .. })
        ));

        // `docker save` the test image, delete it, and have prepare load it back.
        let archive = fx.dir.path().join("image.tar");
        let mut saved = runtime.client().export_image(&fx.image);
        let mut file = std::fs::File::create(&archive).expect("create the archive");
        while let Some(chunk) = saved.next().await {
            std::io::Write::write_all(&mut file, &chunk.expect("export the image"))
                .expect("write the archive");
        }
        drop(file);
        let options = bollard::query_parameters::RemoveImageOptionsBuilder::default()
            .force(true)
            .build();
        runtime
            .client()
            .remove_image(&fx.image, Some(options), None)
            .await
            .expect("remove the image");

        let mut spec = fx.spec("archive", &["exit", "0"]);
        assert!(matches!(
            runtime.prepare(&spec).await,
            Err(RuntimeError::ImageMissing { .. })
        ));
        spec.program = Program::Image {
            image: fx.image.clone(),
            archive: Some(archive.clone()),
            command: Some(vec!["exit".to_owned(), "0".to_owned()]),
        };
        runtime
            .prepare(&spec)
            .await
            .expect("prepare loads the archive");
        runtime
            .prepare(&spec)
            .await
            .expect("prepare again: nothing to load");

        // And the loaded image runs.
        let id = runtime.create(&spec).await.expect("create");
        runtime.start(&id).await.expect("start");
        assert!(runtime.wait(&id).await.expect("wait").is_success());
        runtime.remove(&id).await.expect("remove");

        // An archive that is not there is an I/O error naming it.
        let mut nowhere = spec.clone();
        nowhere.program = Program::Image {
            image: absent,
            archive: Some(fx.dir.path().join("nowhere.tar")),
            command: None,
        };
        match runtime.prepare(&nowhere).await {
            Err(error @ RuntimeError::Io { .. }) => {
                assert!(error.to_string().contains("nowhere.tar"), "{error}");
            }
            other => panic!("prepare with a missing archive: {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn a_container_over_its_memory_limit_is_reported_oom_killed() {
    let fx = Fixture::new("oom").await;
    support::within(TEST_LIMIT, async {
        let runtime = &fx.runtime;
        let mut spec = fx.spec("oom", &["eat"]);
        spec.limits = Limits {
            memory_bytes: Some(32 << 20),
            ..Limits::default()
        };
        let id = runtime.create(&spec).await.expect("create");
        let mut events = runtime.events(&id);
        runtime.start(&id).await.expect("start");

        let exit = runtime.wait(&id).await.expect("wait");
        assert!(exit.oom_killed, "{exit:?}");
        assert!(!exit.is_success());
        assert_eq!(exit.code, Some(137), "{exit:?}");
        assert_eq!(exit.signal, Some(9), "{exit:?}");

        let mut seen = Vec::new();
        while let Some(event) = next_within(&mut events, Duration::from_secs(20)).await {
            seen.push(event);
        }
        let oom_event = seen.contains(&RuntimeEvent::OutOfMemory);
        let oom_exit = seen
            .iter()
            .any(|event| matches!(event, RuntimeEvent::Exited(exit) if exit.oom_killed));
        assert!(oom_event || oom_exit, "no OOM in the events: {seen:?}");
        assert!(
            matches!(seen.last(), Some(RuntimeEvent::Exited(_))),
            "the events did not end with the exit: {seen:?}"
        );
        let state = runtime.inspect(&id).await.expect("inspect");
        assert!(state.exit.is_some_and(|exit| exit.oom_killed));
        runtime.remove(&id).await.expect("remove");

        // A memory-limited container killed through the API also dies of SIGKILL, and
        // is not taken for an OOM kill.
        let mut spec = fx.spec("killed", &["sleep"]);
        spec.limits = Limits {
            memory_bytes: Some(32 << 20),
            ..Limits::default()
        };
        let id = runtime.create(&spec).await.expect("create");
        runtime.start(&id).await.expect("start");
        let killed = tokio::process::Command::new("docker")
            .args(["kill", "--signal", "KILL", &id.0])
            .output()
            .await
            .expect("run docker kill");
        assert!(killed.status.success(), "{killed:?}");
        let exit = runtime.wait(&id).await.expect("wait");
        assert_eq!(exit.signal, Some(9), "{exit:?}");
        assert!(!exit.oom_killed, "{exit:?}");
        runtime.remove(&id).await.expect("remove");
    })
    .await;
}

#[tokio::test]
async fn create_options_are_honoured_under_what_weir_owns() {
    let fx = Fixture::new("options").await;
    support::within(TEST_LIMIT, async {
        let runtime = &fx.runtime;
        let mut spec = fx.spec("options", &["touch"]);
        // As a pipeline's YAML would give them, turned into JSON.
        spec.create_options = serde_json::json!({
            "Labels": {"x": "y"},
            "Env": ["FROM_OPTIONS=1", "TEST_VAR=from-options"],
            "HostConfig": {
                "ReadonlyRootfs": true,
                "RestartPolicy": {"Name": "always"},
            },
        })
        .as_object()
        .cloned()
        .unwrap();
        spec.limits = Limits {
            memory_bytes: Some(64 << 20),
            cpus: Some(0.5),
            pids: Some(32),
        };
        let id = runtime.create(&spec).await.expect("create");

        let inspected = runtime
            .client()
            .inspect_container(&id.0, None)
            .await
            .expect("inspect the container");
        let config = inspected.config.expect("config");
        let labels = config.labels.expect("labels");
        assert_eq!(labels.get("x").map(String::as_str), Some("y"));
        assert_eq!(labels.get("weir.test").map(String::as_str), Some("options"));
        let env = config.env.expect("env");
        for expected in [
            "FROM_OPTIONS=1",
            "TEST_VAR=from-spec",
            "WEIR_MODULE_NAME=options",
            "WEIR_MODULE_ROLE=transform",
            "WEIR_MODULE_SOCKET=/run/weir/module.sock",
            "WEIR_RUNTIME_SOCKET=/run/weir/runtime.sock",
        ] {
            assert!(
                env.iter().any(|e| e == expected),
                "{expected} not in {env:?}"
            );
        }
        assert!(!env.iter().any(|e| e == "TEST_VAR=from-options"), "{env:?}");

        let host = inspected.host_config.expect("host config");
        assert_eq!(host.readonly_rootfs, Some(true));
        let restart = host.restart_policy.expect("restart policy");
        assert_eq!(
            restart.name,
            Some(bollard::models::RestartPolicyNameEnum::NO),
            "Weir's restart policy must win"
        );
        let socket_dir = std::fs::canonicalize(&spec.socket_dir).expect("socket dir made");
        let bind = format!("{}:/run/weir", socket_dir.display());
        assert!(
            host.binds
                .as_ref()
                .is_some_and(|binds| binds.contains(&bind)),
            "{bind} not in {:?}",
            host.binds
        );
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(32));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket_dir).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o7777,
            0o700,
            "the module directory is the module's alone (it runs as root here)"
        );

        // The module directory is writable at /run/weir, though the root is read-only.
        runtime.start(&id).await.expect("start");
        let exit = runtime.wait(&id).await.expect("wait");
        assert!(exit.is_success(), "{exit:?}");
        let hello = std::fs::read_to_string(socket_dir.join("hello")).expect("/run/weir/hello");
        assert_eq!(hello, "hi\n");
        runtime.remove(&id).await.expect("remove");
    })
    .await;
}

#[tokio::test]
async fn a_container_running_as_another_user_gets_a_directory_of_its_own() {
    use std::os::unix::fs::MetadataExt;
    let fx = Fixture::new("nonroot").await;
    support::within(TEST_LIMIT, async {
        let runtime = &fx.runtime;
        let mut spec = fx.spec("nonroot", &["touch"]);
        spec.create_options = serde_json::json!({"User": "1000:1000"})
            .as_object()
            .cloned()
            .unwrap();
        let id = runtime.create(&spec).await.expect("create");
        runtime.start(&id).await.expect("start");
        let exit = runtime.wait(&id).await.expect("wait");
        assert_eq!(
            exit.code,
            Some(0),
            "the module could write its directory: {exit:?}"
        );
        let dir = std::fs::metadata(&spec.socket_dir).expect("the directory");
        let written = std::fs::metadata(spec.socket_dir.join("hello")).expect("its file");
        assert_eq!(written.uid(), 1000);
        if std::fs::metadata(fx.dir.path()).expect("the root").uid() == 0 {
            // The runtime is root: the directory is the module user's, and no one else's.
            assert_eq!(
                (dir.uid(), dir.gid(), dir.mode() & 0o7777),
                (1000, 1000, 0o700)
            );
        }
        runtime.remove(&id).await.expect("remove");
    })
    .await;
}

#[tokio::test]
async fn only_the_containers_of_a_runtime_that_is_gone_are_swept() {
    use weir_modules::runtime::owner::{OWNER_LABEL, Owner};
    let fx = Fixture::new("sweep").await;
    support::within(TEST_LIMIT, async {
        let runtime = &fx.runtime;
        // A runtime that has ended (a process started and reaped), and this one.
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("true runs");
        let gone = Owner::of_process(child.id()).expect("it has a start time");
        child.wait().expect("reaped");
        let alive = Owner::current().expect("this process");
        let mut ids = Vec::new();
        for (role, owner) in [("gone", gone), ("alive", alive)] {
            let mut spec = fx.spec(role, &["sleep"]);
            spec.labels
                .insert(OWNER_LABEL.to_owned(), owner.to_string());
            let id = runtime.create(&spec).await.expect("create");
            runtime.start(&id).await.expect("start");
            ids.push(id);
        }
        let swept = runtime.sweep_leftovers().await.expect("sweeps");
        assert!(swept >= 1, "{swept}");
        assert!(matches!(
            runtime.inspect(&ids[0]).await,
            Err(RuntimeError::NoSuchInstance(_))
        ));
        assert!(runtime.inspect(&ids[1]).await.expect("still there").running);
        runtime.remove(&ids[1]).await.expect("remove");
    })
    .await;
}

#[tokio::test]
async fn bad_create_options_are_refused_with_the_field_named() {
    let fx = Fixture::new("badoptions").await;
    support::within(TEST_LIMIT, async {
        let runtime = &fx.runtime;
        for (options, field) in [
            (
                serde_json::json!({"HostConfig": {"Memory": "lots"}}),
                "HostConfig.Memory",
            ),
            (serde_json::json!({"Lables": {"x": "y"}}), "Lables"),
            (serde_json::json!({"Env": "A=1"}), "Env"),
        ] {
            let mut spec = fx.spec("bad", &["sleep"]);
            spec.create_options = options.as_object().cloned().unwrap();
            match runtime.create(&spec).await {
                Err(error @ RuntimeError::Docker { .. }) => {
                    let message = error.to_string();
                    assert!(message.contains(&format!("`{field}`")), "{message}");
                    assert!(message.contains(&spec.name), "{message}");
                }
                other => panic!("create with bad options {options}: {other:?}"),
            }
            // Nothing was created.
            let found = runtime.client().inspect_container(&spec.name, None).await;
            assert!(found.is_err(), "a container was created: {found:?}");
        }

        // A 404 that is not about the container (its network is missing) is the
        // engine's error, not a vanished instance.
        let mut lost = fx.spec("network", &["sleep"]);
        let network = format!("weir-test-no-network-{}", support::unique());
        lost.create_options = serde_json::json!({"HostConfig": {"NetworkMode": network}})
            .as_object()
            .cloned()
            .unwrap();
        let id = runtime.create(&lost).await.expect("create");
        match runtime.start(&id).await {
            Err(error @ RuntimeError::Docker { .. }) => {
                assert!(error.to_string().contains(&network), "{error}");
            }
            other => panic!("start without its network: {other:?}"),
        }
        runtime.remove(&id).await.expect("remove");

        // A local program is not for the Docker runtime.
        let mut process = fx.spec("process", &["sleep"]);
        process.program = Program::Process {
            command: vec!["/bin/true".to_owned()],
            working_dir: None,
        };
        assert!(matches!(
            runtime.prepare(&process).await,
            Err(RuntimeError::Executable { .. })
        ));
        assert!(matches!(
            runtime.create(&process).await,
            Err(RuntimeError::Executable { .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn a_docker_healthcheck_is_reported() {
    let fx = Fixture::new("health").await;
    support::within(TEST_LIMIT, async {
        let runtime = &fx.runtime;
        let mut ids = Vec::new();
        for (check, expected) in [
            ("0", RuntimeHealth::Healthy),
            ("1", RuntimeHealth::Unhealthy),
        ] {
            let mut spec = fx.spec("health", &["sleep"]);
            // Every 100 ms (in nanoseconds), one failure makes it unhealthy.
            spec.create_options = serde_json::json!({
                "Healthcheck": {
                    "Test": ["CMD", "/prog", "exit", check],
                    "Interval": 100_000_000,
                    "Timeout": 2_000_000_000,
                    "Retries": 1,
                },
            })
            .as_object()
            .cloned()
            .unwrap();
            let id = runtime.create(&spec).await.expect("create");
            let mut events = runtime.events(&id);
            runtime.start(&id).await.expect("start");
            loop {
                match next_within(&mut events, Duration::from_secs(30)).await {
                    Some(RuntimeEvent::Health(health)) => {
                        assert_eq!(health, expected);
                        break;
                    }
                    Some(_) => {}
                    None => panic!("the events ended without a health verdict"),
                }
            }
            let state = runtime.inspect(&id).await.expect("inspect");
            assert_eq!(state.health, Some(expected));
            ids.push(id);
        }
        for id in ids {
            runtime
                .stop(&id, Duration::from_secs(5))
                .await
                .expect("stop");
            runtime.remove(&id).await.expect("remove");
        }
    })
    .await;
}
