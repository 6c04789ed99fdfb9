//! Cancelling a build: the `build.cancel` request and its answer
//! (docs/protocol.md, "Cancel: `build.cancel`").

use serde::{Deserialize, Serialize};

use super::{ErrorBody, MAX_BODY_BYTES, RequestError, quote_for_error};

/// The body of a `build.cancel` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    /// The build to cancel, as sent in its events.
    pub build_id: String,
}

impl CancelRequest {
    /// Parses a cancel body; the id must look like one the builder assigns.
    pub fn parse(body: &[u8]) -> Result<Self, RequestError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(RequestError::BodyTooLarge { len: body.len() });
        }
        let malformed = |err: String| {
            RequestError::MalformedBody(format!("{err}; expected {{\"build_id\": \"...\"}}"))
        };
        // serde would also accept a JSON array for a struct; only an object is valid.
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|err| malformed(err.to_string()))?;
        if !value.is_object() {
            return Err(malformed("not a JSON object".to_owned()));
        }
        let request: Self =
            serde_json::from_value(value).map_err(|err| malformed(err.to_string()))?;
        request.validate()?;
        Ok(request)
    }

    /// Build ids are 1–64 hex digits.
    pub fn validate(&self) -> Result<(), RequestError> {
        let id = &self.build_id;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RequestError::InvalidBuildId {
                build_id: quote_for_error(id),
            });
        }
        Ok(())
    }
}

/// The reply to a `build.cancel` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum CancelEvent {
    /// Whether the build was found, and where.
    Cancel(CancelOutcome),
}

/// What a cancel request found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOutcome {
    pub build_id: String,
    /// Whether a running or waiting build with this id was cancelled.
    pub found: bool,
    /// Where it was: `running` or `queued`; `finishing` (with `found:
    /// false`) when the build had already built its last host and ends with
    /// its own result; `null` when not found.
    pub state: Option<CancelledState>,
    /// Why the request itself was invalid, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Where a cancelled build was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelledState {
    Running,
    Queued,
    /// Too late: every host was done; the build was not cancelled.
    Finishing,
    /// A state from a newer builder.
    #[serde(other)]
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn cancel_bodies_are_json_objects_only() {
        let id = "0123456789abcdef";
        assert_eq!(
            CancelRequest::parse(format!(r#"{{"build_id":"{id}"}}"#).as_bytes())
                .map(|r| r.build_id),
            Ok(id.to_owned())
        );
        for body in [
            format!(r#"["{id}"]"#),
            format!(r#""{id}""#),
            "null".to_owned(),
        ] {
            assert!(
                matches!(
                    CancelRequest::parse(body.as_bytes()),
                    Err(RequestError::MalformedBody(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn cancel_requests_take_a_hex_build_id() {
        assert_eq!(
            CancelRequest::parse(br#"{"build_id":"9c21779d2dc86b9c"}"#).unwrap(),
            CancelRequest {
                build_id: "9c21779d2dc86b9c".into()
            }
        );
        for bad in [
            &b""[..],
            b"{}",
            br#"{"build_id":""}"#,
            br#"{"build_id":"$(id)"}"#,
            br#"{"build_id":"abc","x":1}"#,
        ] {
            let err = CancelRequest::parse(bad).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidRequest);
        }
        let reply = CancelEvent::Cancel(CancelOutcome {
            build_id: "ab".into(),
            found: true,
            state: Some(CancelledState::Running),
            error: None,
        });
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event": "cancel", "build_id": "ab", "found": true, "state": "running"})
        );
    }
}
