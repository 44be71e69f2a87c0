//! apt-get for what the project installs itself (QEMU, kernels, busybox,
//! bpftool, Chromium, libc6-dev...), and the small command helpers it runs
//! them with.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// apt-get, with `apt-get update` run at most once per process and only when
/// an operation fails without it.
#[derive(Default)]
pub(crate) struct Apt {
    updated: bool,
}

impl Apt {
    fn command() -> Command {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    }

    pub(crate) fn update(&mut self) -> Result<()> {
        if !self.updated {
            output(Self::command().arg("update"))?;
            self.updated = true;
        }
        Ok(())
    }

    /// Runs `apt-get ARGS` (in `dir`), retrying once after `apt-get update`.
    pub fn run(&mut self, args: &[&str], dir: Option<&Path>) -> Result<()> {
        let attempt = || {
            let mut cmd = Self::command();
            // As root, apt drops to the `_apt` user to download, which cannot
            // write into our cache dir.
            cmd.args(["-o", "APT::Sandbox::User=root"]).args(args);
            if let Some(dir) = dir {
                cmd.current_dir(dir);
            }
            output(&mut cmd)
        };
        if attempt().is_ok() {
            return Ok(());
        }
        if self.updated {
            return attempt().map(drop);
        }
        eprintln!(
            "guest: apt-get {} failed: updating the package lists",
            args.join(" ")
        );
        self.update()?;
        attempt().map(drop)
    }

    /// `apt-get download PACKAGE` into `dir/debs`; returns the .deb's path.
    pub(crate) fn download(&mut self, package: &str, dir: &Path) -> Result<PathBuf> {
        let debs = dir.join("debs");
        let _ = fs::remove_dir_all(&debs);
        fs::create_dir_all(&debs)?;
        self.run(&["download", package], Some(&debs))?;
        only_entry(&debs, &format!("{package}_"))
    }

    /// Removes what [`Apt::download`] left (call once the .deb is unpacked).
    pub(crate) fn clean_downloads(dir: &Path) {
        let _ = fs::remove_dir_all(dir.join("debs"));
    }
}

/// A command line as a shell would show it.
pub(crate) fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy();
            if a.contains(char::is_whitespace) {
                format!("'{a}'")
            } else {
                a.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` (printing it), failing with its command line and stderr.
pub(crate) fn output_bytes(cmd: &mut Command) -> Result<Vec<u8>> {
    eprintln!("guest: running {}", display(cmd));
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", display(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

/// [`output_bytes`] as text.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output_bytes(cmd)?).into_owned())
}

/// The one entry of `dir` whose name starts with `prefix`.
pub(crate) fn only_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .collect();
    match found.len() {
        1 => Ok(found.pop().unwrap()),
        n => bail!("expected one {prefix}* in {}, found {n}", dir.display()),
    }
}
