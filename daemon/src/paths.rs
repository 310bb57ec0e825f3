//! Where things live when the configuration does not say.
//!
//! Under systemd the unit's `RuntimeDirectory=`/`StateDirectory=` decide; as root
//! the FHS locations; as an ordinary user (a developer, the README's first
//! command) per-user locations, so the built-in defaults run on any machine.

use std::path::{Path, PathBuf};

/// The installed configuration file, used when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/callbox/callbox.toml";
/// The system daemon's control socket.
pub const SYSTEM_SOCKET_PATH: &str = "/run/callbox/control.sock";
/// The system daemon's data directory.
pub const SYSTEM_DATA_DIR: &str = "/var/lib/callbox";
const SOCKET_FILE_NAME: &str = "control.sock";
/// Where the `callbox-models` package installs the models (`speech.models_dir`'s default).
pub const PACKAGED_MODELS_DIR: &str = "/usr/share/callbox/models";

/// What to do when no usable models are in `dir`: the package on a box, the build
/// script on a source checkout.
pub fn how_to_get_models(dir: &Path) -> String {
    let build = "on a source checkout `bash models/build.sh` builds them into models/cache; point \
                 speech.models_dir (or $CALLBOX_MODELS_DIR) there";
    if dir == Path::new(PACKAGED_MODELS_DIR) {
        format!("install the models package (`apt install callbox-models`, or `dpkg -i callbox-models_*.deb`); {build}")
    } else {
        format!(
            "speech.models_dir (or $CALLBOX_MODELS_DIR) points at {}: unset it to use the callbox-models \
             package's {PACKAGED_MODELS_DIR}, or {build}",
            dir.display()
        )
    }
}

/// The process environment that path defaults depend on, captured once so the
/// resolution itself is a pure function (and testable).
#[derive(Debug, Clone, Default)]
pub struct PathEnv {
    pub euid: u32,
    pub runtime_directory: Option<PathBuf>,
    pub state_directory: Option<PathBuf>,
    pub xdg_runtime_dir: Option<PathBuf>,
    pub xdg_state_home: Option<PathBuf>,
    pub home: Option<PathBuf>,
}

impl PathEnv {
    pub fn from_process() -> Self {
        // systemd passes colon-separated lists when a unit names several directories.
        let first_of = |name: &str| {
            std::env::var_os(name)
                .and_then(|v| v.to_str().and_then(|s| s.split(':').next()).map(PathBuf::from))
                .filter(|p| p.is_absolute())
        };
        Self {
            euid: nix::unistd::geteuid().as_raw(),
            runtime_directory: first_of("RUNTIME_DIRECTORY"),
            state_directory: first_of("STATE_DIRECTORY"),
            xdg_runtime_dir: first_of("XDG_RUNTIME_DIR"),
            xdg_state_home: first_of("XDG_STATE_HOME"),
            home: first_of("HOME"),
        }
    }

    /// The control socket the daemon binds when the config does not name one.
    pub fn daemon_socket(&self) -> PathBuf {
        if let Some(dir) = &self.runtime_directory {
            return dir.join(SOCKET_FILE_NAME);
        }
        if self.euid == 0 {
            return PathBuf::from(SYSTEM_SOCKET_PATH);
        }
        self.user_runtime_dir().join(SOCKET_FILE_NAME)
    }

    /// The data directory when the config does not name one.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.state_directory {
            return dir.clone();
        }
        if self.euid == 0 {
            return PathBuf::from(SYSTEM_DATA_DIR);
        }
        match (&self.xdg_state_home, &self.home) {
            (Some(state), _) => state.join("callbox"),
            (None, Some(home)) => home.join(".local/state/callbox"),
            (None, None) => self.user_runtime_dir().join("data"),
        }
    }

    /// Sockets a CLI should try, in order, when neither `--socket` nor a config names one:
    /// the system daemon first (technicians use the CLI from their own accounts),
    /// then a daemon the caller runs as themselves.
    pub fn client_socket_candidates(&self) -> Vec<PathBuf> {
        let mut out = vec![PathBuf::from(SYSTEM_SOCKET_PATH)];
        let own = self.daemon_socket();
        if !out.contains(&own) {
            out.push(own);
        }
        out
    }

    fn user_runtime_dir(&self) -> PathBuf {
        match &self.xdg_runtime_dir {
            Some(dir) => dir.join("callbox"),
            None => Path::new("/tmp").join(format!("callbox-{}", self.euid)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_models_get_the_remedy_that_fits_where_they_were_looked_for() {
        let packaged = how_to_get_models(Path::new(PACKAGED_MODELS_DIR));
        assert!(packaged.contains("apt install callbox-models"), "{packaged}");
        let elsewhere = how_to_get_models(Path::new("/srv/models"));
        assert!(elsewhere.contains("points at /srv/models") && elsewhere.contains("models/build.sh"), "{elsewhere}");
    }

    #[test]
    fn systemd_directories_win_over_everything() {
        let env = PathEnv {
            euid: 0,
            runtime_directory: Some("/run/callbox".into()),
            state_directory: Some("/var/lib/callbox".into()),
            ..Default::default()
        };
        assert_eq!(env.daemon_socket(), Path::new("/run/callbox/control.sock"));
        assert_eq!(env.data_dir(), Path::new("/var/lib/callbox"));
    }

    #[test]
    fn ordinary_user_gets_private_locations() {
        let env = PathEnv {
            euid: 1000,
            xdg_runtime_dir: Some("/run/user/1000".into()),
            home: Some("/home/ana".into()),
            ..Default::default()
        };
        assert_eq!(env.daemon_socket(), Path::new("/run/user/1000/callbox/control.sock"));
        assert_eq!(env.data_dir(), Path::new("/home/ana/.local/state/callbox"));
        assert_eq!(
            env.client_socket_candidates(),
            vec![PathBuf::from(SYSTEM_SOCKET_PATH), PathBuf::from("/run/user/1000/callbox/control.sock")]
        );
    }

    #[test]
    fn user_without_xdg_falls_back_to_tmp_by_uid() {
        let env = PathEnv { euid: 1234, ..Default::default() };
        assert_eq!(env.daemon_socket(), Path::new("/tmp/callbox-1234/control.sock"));
        assert_eq!(env.data_dir(), Path::new("/tmp/callbox-1234/data"));
    }
}
