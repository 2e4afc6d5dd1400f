//! Records the git commit for the start-up line (`BOTFLEET_GIT_COMMIT` wins, e.g. when
//! building from a source tarball).

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BOTFLEET_GIT_COMMIT");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    println!("cargo:rerun-if-changed=../.git/index");
    let commit = std::env::var("BOTFLEET_GIT_COMMIT").ok().or_else(|| {
        let out = Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    println!(
        "cargo:rustc-env=BOTFLEET_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".to_owned())
    );
}
