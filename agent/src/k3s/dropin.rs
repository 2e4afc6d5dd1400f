//! The K3s configuration drop-in this agent owns: `config.yaml.d/50-botfleet.yaml`.
//!
//! Rendering is pure; [`super::Node`] writes the result. Values are written as
//! double-quoted scalars (JSON string syntax is valid YAML), so nothing in a label or URL
//! can add a key.

use std::collections::BTreeMap;

/// Label namespaces the kubelet refuses to set on itself (k3s-agent exits on
/// `node-role.kubernetes.io/*`).
const RESERVED_NAMESPACES: [&str; 2] = ["kubernetes.io", "k8s.io"];
/// Longest label name and value Kubernetes accepts.
const MAX_LABEL_LEN: usize = 63;

/// Why a drop-in cannot be rendered.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DropInError {
    #[error("label prefix {0:?} is not a DNS subdomain outside kubernetes.io and k8s.io")]
    Prefix(String),
    #[error("label name {0:?}: letters, digits, '-', '_' and '.' only, at most 63")]
    LabelName(String),
    #[error("server URL {0:?} must be https://host[:port]")]
    ServerUrl(String),
    #[error(
        "node name (device_id) {0:?} is not a Kubernetes node name: lowercase letters, digits, '-' and '.'"
    )]
    NodeName(String),
}

/// What goes into the drop-in.
#[derive(Debug, Clone, PartialEq)]
pub struct DropIn {
    pub server_url: String,
    /// The token file's path as k3s sees it (on the robot, not under a test root).
    pub token_file: String,
    pub node_name: String,
    /// Label names (without prefix) and values.
    pub labels: BTreeMap<String, String>,
    pub label_prefix: String,
    pub taint: String,
    pub nvidia_runtime: bool,
}

impl DropIn {
    /// The file's text, or why these values cannot go into it.
    pub fn render(&self) -> Result<String, DropInError> {
        check_prefix(&self.label_prefix)?;
        check_server_url(&self.server_url)?;
        check_node_name(&self.node_name)?;
        let q = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
        let mut out = String::from(
            "# Written by botfleet-agent (k3s join); removed by `botfleet-agent k3s leave`.\n\
             # Do not edit: the next join or token rotation rewrites it.\n",
        );
        out += &format!("server: {}\n", q(&self.server_url));
        out += &format!("token-file: {}\n", q(&self.token_file));
        out += &format!("node-name: {}\n", q(&self.node_name));
        if !self.labels.is_empty() {
            out += "node-label:\n";
            for (name, value) in &self.labels {
                check_label_name(name)?;
                let label = format!("{}/{name}={}", self.label_prefix, label_value(value));
                out += &format!("  - {}\n", q(&label));
            }
        }
        out += &format!("node-taint:\n  - {}\n", q(&self.taint));
        if self.nvidia_runtime {
            out += "default-runtime: \"nvidia\"\n";
        }
        Ok(out)
    }
}

/// The server URL written in a drop-in, if it is ours.
pub fn server_url_of(text: &str) -> Option<String> {
    let quoted = text.lines().find_map(|l| l.strip_prefix("server: "))?;
    serde_json::from_str(quoted).ok()
}

fn check_prefix(prefix: &str) -> Result<(), DropInError> {
    let err = || DropInError::Prefix(prefix.to_owned());
    let dns = !prefix.is_empty()
        && prefix.len() <= 253
        && prefix.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
    let reserved = RESERVED_NAMESPACES
        .iter()
        .any(|ns| prefix == *ns || prefix.ends_with(&format!(".{ns}")));
    if dns && !reserved { Ok(()) } else { Err(err()) }
}

/// Kubernetes names start and end with a letter or digit.
fn alphanumeric_ends(name: &str) -> bool {
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    alnum(name.bytes().next()) && alnum(name.bytes().last())
}

fn check_node_name(name: &str) -> Result<(), DropInError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && alphanumeric_ends(name);
    if ok {
        Ok(())
    } else {
        Err(DropInError::NodeName(name.to_owned()))
    }
}

fn check_label_name(name: &str) -> Result<(), DropInError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LABEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && alphanumeric_ends(name);
    if ok {
        Ok(())
    } else {
        Err(DropInError::LabelName(name.to_owned()))
    }
}

fn check_server_url(url: &str) -> Result<(), DropInError> {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "https" && u.host_str().is_some() && u.path() == "/" => Ok(()),
        _ => Err(DropInError::ServerUrl(url.to_owned())),
    }
}

/// A device label value made into a valid Kubernetes label value: other characters become
/// '-', the ends are alphanumeric, at most 63 bytes ("NVIDIA Jetson Orin Nano Developer Kit"
/// becomes "NVIDIA-Jetson-Orin-Nano-Developer-Kit").
pub fn label_value(value: &str) -> String {
    let mapped: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let mut v: String = mapped.chars().take(MAX_LABEL_LEN).collect();
    while v.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        v.pop();
    }
    v.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> DropIn {
        DropIn {
            server_url: "https://10.0.0.1:6443".into(),
            token_file: "/etc/rancher/k3s/botfleet-token".into(),
            node_name: "robot-1".into(),
            labels: BTreeMap::from([
                ("arch".into(), "aarch64".into()),
                (
                    "board".into(),
                    "NVIDIA Jetson Orin Nano Developer Kit".into(),
                ),
                ("site".into(), "lab".into()),
            ]),
            label_prefix: "botfleet.io".into(),
            taint: "edge=true:NoSchedule".into(),
            nvidia_runtime: true,
        }
    }

    /// Golden test: the exact file k3s will read.
    #[test]
    fn the_drop_in_renders_exactly_as_k3s_expects_it() {
        let golden = include_str!("testdata/50-botfleet.yaml");
        assert_eq!(sample().render().unwrap(), golden);
    }

    #[test]
    fn a_robot_without_the_nvidia_runtime_keeps_the_default_runtime() {
        let mut d = sample();
        d.nvidia_runtime = false;
        assert!(!d.render().unwrap().contains("default-runtime"));
    }

    #[test]
    fn node_role_and_other_kubernetes_namespaces_are_refused_as_prefix() {
        for prefix in [
            "node-role.kubernetes.io",
            "kubernetes.io",
            "node.k8s.io",
            "Bad_Prefix",
        ] {
            let mut d = sample();
            d.label_prefix = prefix.into();
            assert_eq!(d.render(), Err(DropInError::Prefix(prefix.into())));
        }
    }

    #[test]
    fn a_label_name_cannot_smuggle_in_another_namespace() {
        let mut d = sample();
        d.labels
            .insert("node-role.kubernetes.io/worker".into(), "true".into());
        assert!(matches!(d.render(), Err(DropInError::LabelName(_))));
    }

    #[test]
    fn values_cannot_add_yaml_keys() {
        let mut d = sample();
        d.labels
            .insert("site".into(), "lab\"\nkubelet-arg: evil".into());
        let text = d.render().unwrap();
        assert!(!text.contains("\nkubelet-arg"));
        assert!(text.contains("\"botfleet.io/site=lab--kubelet-arg--evil\""));
    }

    #[test]
    fn only_https_servers_are_accepted() {
        for url in [
            "http://10.0.0.1:6443",
            "10.0.0.1:6443",
            "https://h:6443/x",
            "",
        ] {
            let mut d = sample();
            d.server_url = url.into();
            assert_eq!(d.render(), Err(DropInError::ServerUrl(url.into())));
        }
    }

    #[test]
    fn a_device_id_that_is_no_kubernetes_node_name_is_refused() {
        for name in ["", "Robot-1", "robot_1", "-robot"] {
            let mut d = sample();
            d.node_name = name.into();
            assert_eq!(d.render(), Err(DropInError::NodeName(name.into())));
        }
    }

    #[test]
    fn the_server_url_is_read_back_from_our_drop_in() {
        let text = sample().render().unwrap();
        assert_eq!(
            server_url_of(&text).as_deref(),
            Some("https://10.0.0.1:6443")
        );
    }
}
