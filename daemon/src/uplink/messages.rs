//! What HQ gets, message by message: the `data` of each kind, with its schema
//! (`docs/hq/*.schema.json` says the same in JSON Schema). Pure types: the store makes
//! them, `callbox hq listen` checks them (unknown fields refused).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::aggregates::IntervalReport;
use super::outbox::{Envelope, Gap, Lane, GAP_KIND};

/// One finished call: metadata, counts and tags; no text, never the caller's number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallReport {
    pub call: String,
    pub source: String,
    pub line: String,
    pub started_unix_ms: i64,
    pub ended_unix_ms: i64,
    pub duration_secs: f64,
    /// Seconds of speech per leg.
    pub talk_secs: BTreeMap<String, f64>,
    pub utterances: i64,
    /// The agent's pseudonym (a keyed hash, stable on this box).
    pub agent: Option<String>,
    pub campaign: Option<String>,
    pub script: Option<String>,
    pub phase: Option<String>,
    pub intents: BTreeMap<String, u32>,
    pub emotions: BTreeMap<String, u32>,
    pub rule_hits: BTreeMap<String, u32>,
    pub events: BTreeMap<String, u32>,
    pub tags: Vec<String>,
    pub converted: bool,
    /// The caller's keyed hash (never the number).
    pub customer: Option<String>,
}

/// A rule hit or event, as it happens: ids, names and times, never text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HitReport {
    pub call: String,
    pub line: String,
    pub agent: Option<String>,
    pub campaign: Option<String>,
    pub script: Option<String>,
    pub rule: String,
    pub severity: String,
    pub event: Option<String>,
    /// Seconds into the call.
    pub at_secs: f64,
}

/// The box's health now and then (`hq.diagnostics_mins`): component states (never their
/// free-text details), the store's counters, free disk and the outbox. Evicted first when
/// the outbox is full, and dropped unsent after a day (a gap says so).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiagnosticsReport {
    pub daemon_version: String,
    pub uptime_secs: u64,
    /// Component → `starting`, `ok`, `degraded`, `failed` or `stopped`.
    pub components: BTreeMap<String, String>,
    pub store_writes: u64,
    pub store_refused: u64,
    pub store_waiting: u64,
    pub audio_dropped: u64,
    pub disk_free_mb: Option<u64>,
    /// Outbox rows and bytes per lane when the report was queued (this one not counted).
    pub outbox_rows: BTreeMap<String, u64>,
    pub outbox_bytes: BTreeMap<String, u64>,
    /// Messages shed for room since the daemon started.
    pub outbox_shed: u64,
}

/// A customer's tags as they are now (sent when a tag is added): HQ keeps the highest
/// `revision` per customer, so a resend or a late copy changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerTags {
    /// The caller's keyed hash (never the number).
    pub customer: String,
    /// Grows with every change on this box.
    pub revision: i64,
    pub tags: Vec<String>,
    /// Calls linked to the customer on this box.
    pub calls: i64,
}

/// A finished call the PBX/CRM said was converted after its summary went out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LateConversion {
    pub call: String,
    pub ended_unix_ms: i64,
    pub agent: Option<String>,
    pub campaign: Option<String>,
    pub script: Option<String>,
    pub customer: Option<String>,
}

/// A customer was forgotten (consent revoked): HQ erases what it holds under the hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErasureNotice {
    pub customer: String,
    pub calls: u64,
    /// Messages about the customer still waiting on the box, dropped unsent.
    pub unsent_dropped: u64,
}

/// Checks a message as HQ receives it: the envelope, its kind's data, and that the topic
/// (`up/{lane}/{kind}` or `gap`) agrees with them. Returns the envelope (data as JSON).
pub fn check(topic_tail: &str, body: &[u8]) -> Result<Envelope<serde_json::Value>, String> {
    let env: Envelope<serde_json::Value> = serde_json::from_slice(body).map_err(|e| format!("envelope: {e}"))?;
    if env.v != 1 {
        return Err(format!("version {} (this HQ end knows 1)", env.v));
    }
    if env.id.len() != 28 || !env.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("id: expected 28 hex digits".into());
    }
    let expected = super::outbox::topic_suffix(env.lane, &env.kind);
    if topic_tail != expected {
        return Err(format!("published on {topic_tail:?} but says {expected:?}"));
    }
    let data = env.data.clone();
    let fits = match (env.lane, env.kind.as_str()) {
        (_, GAP_KIND) => fits::<Gap>(data),
        (Lane::Diagnostics, "health") => fits::<DiagnosticsReport>(data),
        (Lane::Calls, "conversion") => fits::<LateConversion>(data),
        (Lane::Calls, "customer_tags") => fits::<CustomerTags>(data),
        (Lane::Calls, "call") => fits::<CallReport>(data),
        (Lane::Aggregates, "interval") => fits::<IntervalReport>(data),
        (Lane::Compliance, "erasure") => fits::<ErasureNotice>(data),
        (Lane::Alert | Lane::Compliance, _) => fits::<HitReport>(data),
        (lane, kind) => Err(format!("no kind {kind:?} in lane {}", lane.name())),
    };
    fits.map_err(|e| format!("{} {}: {e}", env.lane.name(), env.kind))?;
    Ok(env)
}

/// Checks that a message speaks only for the box that sent it (the topic's site and box):
/// an aggregate's key names them too, and must name the same.
pub fn check_origin(site: &str, box_id: &str, env: &Envelope<serde_json::Value>) -> Result<(), String> {
    if env.kind == "interval" {
        let key = &env.data["key"];
        if key["site"] != site || key["box"] != box_id {
            return Err(format!("an aggregate from {site}/{box_id} keyed for {}/{}", key["site"], key["box"]));
        }
    }
    Ok(())
}

/// Whether `data` reads as a `T` (unknown fields refused by `T`'s own serde attributes).
fn fits<T: serde::de::DeserializeOwned>(data: serde_json::Value) -> Result<(), String> {
    serde_json::from_value::<T>(data).map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::aggregates::{AggregateKey, Counters};
    use crate::uplink::link::{Ack, Birth, BoxState};

    /// The property names a schema file lists, and its required ones.
    fn schema(text: &str) -> (Vec<String>, Vec<String>) {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["additionalProperties"], false, "a schema must close its object");
        let mut props: Vec<String> = v["properties"].as_object().unwrap().keys().cloned().collect();
        let mut required: Vec<String> =
            v["required"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()).collect();
        props.sort();
        required.sort();
        (props, required)
    }

    fn fields<T: Serialize>(value: &T) -> Vec<String> {
        let mut keys: Vec<String> = serde_json::to_value(value).unwrap().as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    #[test]
    fn the_published_schemas_name_exactly_the_fields_the_box_sends() {
        let call = CallReport {
            call: "c".into(),
            source: "spool".into(),
            line: "l".into(),
            started_unix_ms: 1,
            ended_unix_ms: 2,
            duration_secs: 0.0,
            talk_secs: BTreeMap::new(),
            utterances: 0,
            agent: None,
            campaign: None,
            script: None,
            phase: None,
            intents: BTreeMap::new(),
            emotions: BTreeMap::new(),
            rule_hits: BTreeMap::new(),
            events: BTreeMap::new(),
            tags: vec![],
            converted: false,
            customer: None,
        };
        let hit = HitReport {
            call: "c".into(),
            line: "l".into(),
            agent: None,
            campaign: None,
            script: None,
            rule: "r".into(),
            severity: "critical".into(),
            event: None,
            at_secs: 1.0,
        };
        let gap = Gap { lane: Lane::Calls, from_seq: 1, to_seq: 2, count: 2, why: "quota".into() };
        let erasure = ErasureNotice { customer: "h".into(), calls: 1, unsent_dropped: 0 };
        let env =
            Envelope { v: 1, id: "i".into(), lane: Lane::Calls, seq: 1, kind: "call".into(), at_unix_ms: 1, data: 0 };
        let state = BoxState { online: true, boot_id: "b".into(), at_unix_ms: 1 };
        let birth = Birth {
            daemon_version: "0".into(),
            boot_id: "b".into(),
            site: "s".into(),
            box_id: "x".into(),
            config_generation: 1,
            models_version: "m".into(),
            rules_version: "r".into(),
            max_concurrent_calls: 1,
            call_limit: 1,
            call_limit_source: "calls.max_concurrent".into(),
            rated_capacity: None,
            at_unix_ms: 1,
        };
        let ack = Ack { ids: vec![] };
        let tags = CustomerTags { customer: "h".into(), revision: 1, tags: vec![], calls: 1 };
        let key = AggregateKey {
            site: "s".into(),
            box_id: "b".into(),
            window_start_unix_ms: 0,
            window_secs: 300,
            agent: None,
            campaign: None,
            script: None,
            rules_version: "r".into(),
            models_version: "m".into(),
        };
        let interval = IntervalReport::new(key.clone(), Counters::default());
        let interval_schema = include_str!("../../../packaging/hq/interval.schema.json");
        // The nested objects are checked too (the schema keeps them in `$defs`).
        let defs: serde_json::Value = serde_json::from_str(interval_schema).unwrap();
        for (name, sent) in [
            ("key", fields(&key)),
            ("counters", fields(&Counters::default())),
            ("histogram", fields(&crate::uplink::aggregates::Histogram::default())),
        ] {
            let (props, required) = schema(&defs["$defs"][name].to_string());
            assert_eq!(props, sent, "$defs/{name}");
            assert_eq!(required, sent, "$defs/{name}");
        }
        let conversion = LateConversion {
            call: "c".into(),
            ended_unix_ms: 1,
            agent: None,
            campaign: None,
            script: None,
            customer: None,
        };
        let cases: [(&str, Vec<String>); 12] = [
            (include_str!("../../../packaging/hq/conversion.schema.json"), fields(&conversion)),
            (include_str!("../../../packaging/hq/health.schema.json"), fields(&DiagnosticsReport::default())),
            (interval_schema, fields(&interval)),
            (include_str!("../../../packaging/hq/customer_tags.schema.json"), fields(&tags)),
            (include_str!("../../../packaging/hq/call.schema.json"), fields(&call)),
            (include_str!("../../../packaging/hq/hit.schema.json"), fields(&hit)),
            (include_str!("../../../packaging/hq/gap.schema.json"), fields(&gap)),
            (include_str!("../../../packaging/hq/erasure.schema.json"), fields(&erasure)),
            (include_str!("../../../packaging/hq/envelope.schema.json"), fields(&env)),
            (include_str!("../../../packaging/hq/state.schema.json"), fields(&state)),
            (include_str!("../../../packaging/hq/birth.schema.json"), fields(&birth)),
            (include_str!("../../../packaging/hq/ack.schema.json"), fields(&ack)),
        ];
        for (text, sent) in cases {
            let (props, required) = schema(text);
            assert_eq!(props, sent, "{text}");
            assert_eq!(required, sent, "every field is always sent (null when unknown)");
        }
    }

    #[test]
    fn hq_refuses_a_message_whose_topic_kind_or_data_disagree() {
        let body = |lane: &str, kind: &str, data: serde_json::Value| {
            serde_json::to_vec(&serde_json::json!({"v": 1, "id": "0123456789abcdef0123456789ab", "lane": lane,
                "seq": 1, "kind": kind, "at_unix_ms": 1, "data": data}))
            .unwrap()
        };
        let gap = serde_json::json!({"lane": "calls", "from_seq": 1, "to_seq": 2, "count": 2, "why": "quota"});
        assert!(check("gap", &body("calls", "gap", gap.clone())).is_ok());
        assert!(check("up/calls/gap", &body("calls", "gap", gap.clone())).is_err(), "gaps go to .../gap");
        assert!(check("up/calls/call", &body("calls", "call", gap)).is_err(), "a gap is not a call");
        let erasure = serde_json::json!({"customer": "h", "calls": 1, "unsent_dropped": 0});
        assert!(check("up/compliance/erasure", &body("compliance", "erasure", erasure.clone())).is_ok());
        assert!(check("up/alert/erasure", &body("compliance", "erasure", erasure.clone())).is_err());
        let mut extra = erasure;
        extra["number"] = "13800138000".into();
        assert!(
            check("up/compliance/erasure", &body("compliance", "erasure", extra)).is_err(),
            "unknown fields refused"
        );
        assert!(check("up/calls/call", b"{}").is_err());
        let tags = serde_json::json!({"customer": "h", "revision": 3, "tags": ["price_sensitive"], "calls": 2});
        assert!(check("up/calls/customer_tags", &body("calls", "customer_tags", tags.clone())).is_ok());
        assert!(check("up/calls/customer_tags", &body("calls", "customer_tags", serde_json::json!({"customer": "h"})))
            .is_err());
    }

    #[test]
    fn an_aggregate_speaks_only_for_the_box_that_sent_it() {
        let key = AggregateKey {
            site: "site-a".into(),
            box_id: "box-1".into(),
            window_start_unix_ms: 0,
            window_secs: 300,
            agent: None,
            campaign: None,
            script: None,
            rules_version: "r".into(),
            models_version: "m".into(),
        };
        let env = Envelope {
            v: 1,
            id: "0123456789abcdef0123456789ab".into(),
            lane: Lane::Aggregates,
            seq: 1,
            kind: "interval".into(),
            at_unix_ms: 1,
            data: serde_json::to_value(IntervalReport::new(key, Counters::default())).unwrap(),
        };
        let body = serde_json::to_vec(&env).unwrap();
        let checked = check("up/aggregates/interval", &body).unwrap();
        assert!(check_origin("site-a", "box-1", &checked).is_ok());
        assert!(check_origin("site-a", "box-2", &checked).is_err(), "box-2 may not report box-1's window");
    }
}
