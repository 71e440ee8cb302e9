//! Client acknowledgements: `{"lsn":"X/Y"}`, checked before they reach Postgres.
//!
//! An ack tells the slot that everything before the LSN may be forgotten, so a wrong one
//! loses data. We refuse acks that go backwards (the slot cannot move back) and acks
//! beyond the last `nextlsn` we delivered (that would skip changes the client never saw).

use serde::Deserialize;

use crate::types::Lsn;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("invalid ack: expected a JSON object like {{\"lsn\":\"0/170FCB0\"}} ({0})")]
    Malformed(String),
    #[error("ack {ack} goes backwards: the last ack was {last}")]
    Backwards { ack: Lsn, last: Lsn },
    #[error("ack {ack} is beyond what was delivered: the last nextlsn sent is {delivered}")]
    Ahead { ack: Lsn, delivered: Lsn },
}

#[derive(Deserialize)]
struct AckMessage {
    lsn: String,
}

/// Parses a client's text message as an ack.
pub fn parse_ack(text: &str) -> Result<Lsn, AckError> {
    let msg: AckMessage = serde_json::from_str(text).map_err(|e| AckError::Malformed(e.to_string()))?;
    msg.lsn.parse().map_err(|e: crate::types::lsn::LsnParseError| AckError::Malformed(e.to_string()))
}

/// Checks `ack` against the last accepted ack and the last delivered `nextlsn`.
/// Repeating the last ack is fine.
pub fn check_ack(ack: Lsn, last: Lsn, delivered: Lsn) -> Result<Lsn, AckError> {
    if ack < last {
        Err(AckError::Backwards { ack, last })
    } else if ack > delivered {
        Err(AckError::Ahead { ack, delivered })
    } else {
        Ok(ack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_acks() {
        assert_eq!(parse_ack(r#"{"lsn":"0/170FCB0"}"#), Ok(Lsn(0x170_FCB0)));
        assert_eq!(parse_ack(r#" {"lsn" : "16/b374d848", "extra": 1} "#), Ok(Lsn(0x16_B374_D848)));
        for bad in
            ["", "lsn", "{}", r#"{"lsn":1}"#, r#"{"lsn":"x"}"#, r#"{"lsn":"0/1""#, "[]", "null", r#"{"lsn":null}"#]
        {
            assert!(matches!(parse_ack(bad), Err(AckError::Malformed(_))), "{bad:?}");
        }
    }

    #[test]
    fn checks_order() {
        assert_eq!(check_ack(Lsn(5), Lsn(5), Lsn(9)), Ok(Lsn(5)));
        assert_eq!(check_ack(Lsn(9), Lsn(5), Lsn(9)), Ok(Lsn(9)));
        assert_eq!(check_ack(Lsn(4), Lsn(5), Lsn(9)), Err(AckError::Backwards { ack: Lsn(4), last: Lsn(5) }));
        assert_eq!(check_ack(Lsn(10), Lsn(5), Lsn(9)), Err(AckError::Ahead { ack: Lsn(10), delivered: Lsn(9) }));
    }
}
