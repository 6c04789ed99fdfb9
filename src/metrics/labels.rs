//! Label values with credentials masked as they enter the registry, so a
//! scrape sends the encoded text as it is, without scanning it.

use std::borrow::Cow;

use prometheus::core::{MetricVec, MetricVecBuilder};

use crate::redact::redact;

/// A labelled metric whose label values pass through [`redact`] on the
/// way in: a machine URI from Nix's log (`ssh://user:PASSWORD@host`) or
/// anything else from the config or the wire becomes a series with the
/// secret masked, once, when the series is created or looked up.
///
/// Only the calls that take label values are offered, so none can bypass
/// the masking.
#[derive(Clone)]
pub struct Masked<V>(V);

impl<B: MetricVecBuilder> Masked<MetricVec<B>> {
    /// Wraps `vec`; it must already be registered.
    pub(super) fn new(vec: MetricVec<B>) -> Self {
        Self(vec)
    }

    /// The series for `values` (masked), created at zero if new.
    pub fn with_label_values(&self, values: &[&str]) -> B::M {
        match masked(values) {
            None => self.0.with_label_values(values),
            Some(masked) => self.0.with_label_values(&as_strs(&masked)),
        }
    }

    /// Removes the series for `values` (masked as when it was made).
    pub fn remove_label_values(&self, values: &[&str]) -> prometheus::Result<()> {
        match masked(values) {
            None => self.0.remove_label_values(values),
            Some(masked) => self.0.remove_label_values(&as_strs(&masked)),
        }
    }
}

/// `values` with credentials masked; `None` when none had any (the
/// common case, which then allocates nothing).
fn masked<'a>(values: &[&'a str]) -> Option<Vec<Cow<'a, str>>> {
    let hides = |value: &str| matches!(redact(value), Cow::Owned(_));
    values
        .iter()
        .any(|value| hides(value))
        .then(|| values.iter().map(|value| redact(value)).collect())
}

fn as_strs<'a>(values: &'a [Cow<'_, str>]) -> Vec<&'a str> {
    values.iter().map(AsRef::as_ref).collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::metrics::Metrics;
    use crate::protocol::{BuildStatus, HostStatus};
    use crate::redact::redact;

    #[test]
    fn credentials_given_to_labels_never_appear_in_a_scrape() {
        let metrics = Metrics::new(["git+https://oauth2:SECRET1@git.example/r"]).unwrap();
        let machine = "ssh://root:SECRET2@builder1.lab";
        metrics.remote_builds.with_label_values(&[machine]).inc();
        metrics.machine_up.with_label_values(&[machine]).set(1);
        metrics
            .machine_up
            .with_label_values(&["ssh-ng://b2?ssh-key=SECRET3"])
            .set(0);
        metrics.host_finished("https://SECRET4@h/r", "ns1", HostStatus::Success, 1.0, 1.0);
        metrics.build_finished("r?access_token=SECRET5", BuildStatus::Failed, 2.0);
        metrics.set_host_closure_size("r", "https://u:SECRET6@h", 1);

        let text = metrics.render();
        assert!(!text.contains("SECRET"), "{text}");
        for masked in [
            "remote_builds_total{machine=\"ssh://***@builder1.lab\"} 1",
            "machine_up{machine=\"ssh://***@builder1.lab\"} 1",
            "machine_up{machine=\"ssh-ng://b2?ssh-key=***\"} 0",
            "builds_total{repo=\"git+https://***@git.example/r\",status=\"success\"} 0",
            "host_builds_total{host=\"ns1\",repo=\"https://***@h/r\",status=\"success\"} 1",
            "builds_total{repo=\"r?access_token=***\",status=\"failed\"} 1",
            "host_closure_size_bytes{host=\"https://***@h\",repo=\"r\"} 1",
        ] {
            assert!(text.contains(masked), "no {masked:?} in:\n{text}");
        }

        // A series is removed by the value it was made with.
        metrics.machine_up.remove_label_values(&[machine]).unwrap();
        assert!(
            !metrics
                .render()
                .contains("machine_up{machine=\"ssh://***@builder1.lab\"}")
        );
    }

    proptest! {
        /// Whatever the label values, the encoded text holds nothing
        /// [`redact`] would still hide: the scrape need not scan it.
        #[test]
        fn encoded_text_needs_no_redaction(
            repo in any::<String>(),
            host in any::<String>(),
            machine in any::<String>(),
            token in "T[A-Z0-9_~.%-]{7,30}",
        ) {
            let metrics = Metrics::new([repo.as_str()]).unwrap();
            let url = format!("{machine}git+https://oauth2:{token}@h/r?token={token}{host}");
            metrics.host_finished(&repo, &host, HostStatus::Failed, 1.0, 1.0);
            metrics.host_finished(&url, &host, HostStatus::Success, 1.0, 1.0);
            metrics.remote_builds.with_label_values(&[&machine]).inc();
            metrics.machine_up.with_label_values(&[&url]).set(1);
            let text = metrics.render();
            prop_assert!(!text.contains(&token));
            prop_assert_eq!(redact(&text), text.as_str());
        }
    }
}
