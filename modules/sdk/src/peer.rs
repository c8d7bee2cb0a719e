//! Who may connect to a module socket: both ends of the protocol (the module's server and
//! the runtime's endpoint for source modules) accept a connection only from a peer whose
//! user may be there.
//!
//! The runtime gives each module a private directory owned for the module's user, so the
//! file system already keeps others out; checking the peer's credentials as well means a
//! socket that ends up somewhere more open (a path chosen by hand, a directory whose mode
//! someone loosened) still answers no one else.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

/// Whether a peer of `peer_uid` may connect to a socket in a directory of `dir_mode` owned
/// by `dir_uid`, served by a process of `own_uid`: root, the directory's owner and the
/// server's own user always may; anyone may when the directory lets anyone in (writable
/// by all, as a shared directory is when the module's user could not be given one).
pub fn admits(peer_uid: u32, dir_mode: u32, dir_uid: u32, own_uid: u32) -> bool {
    dir_mode & 0o002 != 0 || peer_uid == 0 || peer_uid == dir_uid || peer_uid == own_uid
}

/// A Unix listener that drops connections [`admits`] refuses, with a warning naming the
/// user, and hands the others to the server.
pub struct PeerCheckedListener {
    listener: tokio::net::UnixListener,
    dir: PathBuf,
    own_uid: u32,
}

impl PeerCheckedListener {
    /// Checks connections to `listener`, bound at `path`. The server's own user is the
    /// owner of the socket file, which binding just made.
    pub fn new(listener: tokio::net::UnixListener, path: &Path) -> std::io::Result<Self> {
        let own_uid = std::fs::metadata(path)?.uid();
        Ok(PeerCheckedListener {
            listener,
            dir: path.parent().map(Path::to_owned).unwrap_or_default(),
            own_uid,
        })
    }

    fn admits(&self, peer_uid: u32) -> bool {
        // Read each time: the directory's mode and owner may change under a running server.
        std::fs::metadata(&self.dir)
            .is_ok_and(|dir| admits(peer_uid, dir.mode(), dir.uid(), self.own_uid))
    }
}

impl axum::serve::Listener for PeerCheckedListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
            match stream.peer_cred() {
                Ok(peer) if self.admits(peer.uid()) => return (stream, addr),
                Ok(peer) => tracing::warn!(
                    socket_dir = %self.dir.display(),
                    uid = peer.uid(),
                    "refused a connection to a module socket from a user that is neither \
                     root, the directory's owner nor the server's own"
                ),
                Err(error) => tracing::warn!("cannot read a connection's peer: {error}"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_the_owner_and_the_server_get_in_and_others_only_through_an_open_directory() {
        let (private, open) = (0o040_700, 0o041_777);
        for peer in [0, 1000, 2000] {
            assert!(admits(peer, private, 1000, 2000), "uid {peer}");
        }
        assert!(!admits(3000, private, 1000, 2000));
        assert!(!admits(3000, 0o040_755, 1000, 2000));
        assert!(admits(3000, open, 1000, 2000));
    }

    /// What a client running as `uid` gets back from the socket at `path` for a health
    /// request: the answer's first line, or nothing when the server hung up.
    fn ask_as(uid: u32, path: &Path) -> String {
        // A hang-up shows as a broken pipe or an empty read: either way, no answer.
        let script = "import socket,sys\n\
            s=socket.socket(socket.AF_UNIX)\n\
            s.connect(sys.argv[1])\n\
            try:\n\
            \x20s.sendall(b'GET /v1/health HTTP/1.1\\r\\nHost: weir\\r\\n\\r\\n')\n\
            \x20print(s.recv(4096).decode().split('\\r\\n')[0])\n\
            except OSError:\n\
            \x20pass";
        let output = std::process::Command::new("setpriv")
            .args([format!("--reuid={uid}"), format!("--regid={uid}")])
            // Debian's Python: a pyenv one lives under /root, which the other user
            // cannot read.
            .args(["--clear-groups", "/usr/bin/python3", "-c", script])
            .arg(path)
            .output()
            .expect("setpriv and python3 run");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_from_another_user_is_dropped_unanswered() {
        use std::os::unix::fs::PermissionsExt as _;
        if std::fs::metadata("/proc/self").map(|me| me.uid()).ok() != Some(0) {
            eprintln!("skipped: switching to another user needs root");
            return;
        }
        // A directory others may enter but not write, holding a socket anyone may open:
        // only the credentials check stands between another user and the server.
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("module.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let listener = PeerCheckedListener::new(listener, &path).unwrap();
        let router = axum::Router::new().route("/v1/health", axum::routing::get(|| async { "ok" }));
        let server = tokio::spawn(async move { axum::serve(listener, router).await });

        let asked = path.clone();
        let (root, nobody) =
            tokio::task::spawn_blocking(move || (ask_as(0, &asked), ask_as(65534, &asked)))
                .await
                .unwrap();
        assert_eq!(root, "HTTP/1.1 200 OK");
        assert_eq!(
            nobody, "",
            "a user who is neither root nor the owner was answered"
        );

        // Opened to everyone, the directory lets the same user in.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let nobody = tokio::task::spawn_blocking(move || ask_as(65534, &path))
            .await
            .unwrap();
        assert_eq!(nobody, "HTTP/1.1 200 OK");
        server.abort();
    }
}
