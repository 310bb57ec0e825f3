//! The one text rendering of understood utterances, events and finished calls, shared by
//! `callbox watch`, `callbox demo` (both from the protocol's monitor items) and
//! `callbox analyze` (which converts its offline results to the same items).

use serde::Serialize;

use crate::control::protocol::{CallFinishedItem, EventItem, MonitorItem, UtteranceItem};

/// One block for a monitor item. `latency` is how long after the end of the utterance's
/// words the item arrived, when the caller knows.
pub fn monitor_item(item: &MonitorItem, latency: Option<f64>) -> String {
    let after = latency.map_or(String::new(), |l| format!("  (+{l:.2} s after the words)"));
    match item {
        MonitorItem::Utterance(u) => utterance(u, &after),
        MonitorItem::Event(e) => event(e, &after),
        MonitorItem::CallFinished(f) => call_finished(f),
    }
}

fn utterance(u: &UtteranceItem, after: &str) -> String {
    // A second label over the threshold shows as "human_request+do_not_call".
    let intent = u.intent.as_ref().map_or(String::new(), |i| {
        let names = if i.labels.len() > 1 { i.labels.join("+") } else { i.label.clone() };
        format!("intent {names} {:.2}, ", i.confidence)
    });
    let rules = if u.rules.is_empty() { String::new() } else { format!("  rules: {}", u.rules.join(", ")) };
    format!(
        "[{:6.2}–{:6.2} s] {:<8} {}\n                    {intent}emotion {}, phase {}{rules}{after}",
        u.start_secs,
        u.end_secs,
        u.leg,
        u.text,
        u.emotion.as_deref().unwrap_or("-"),
        u.phase,
    )
}

fn event(e: &EventItem, after: &str) -> String {
    format!(
        ">>> EVENT {} at {:.1} s  rule {}: {}  (utterances {:?}){after}",
        e.kind, e.at_secs, e.rule, e.reason, e.utterances
    )
}

fn call_finished(f: &CallFinishedItem) -> String {
    let customer = match &f.customer {
        None => "no caller number".to_owned(),
        Some(c) => {
            let tags: Vec<String> = c.tags.iter().map(|t| format!("{} ×{}", t.tag, t.calls)).collect();
            format!("customer {} ({} calls): [{}]", c.customer, c.calls, tags.join(", "))
        }
    };
    format!(
        "call {} finished: {} utterances, {} rule hits, {} events; phase {}; tags [{}]; {customer}",
        f.call,
        f.utterances,
        f.rule_hits,
        f.events,
        f.phase,
        f.tags.join(", "),
    )
}
/// Pretty JSON on stdout (`--json`).
pub fn print_json<T: Serialize + ?Sized>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("callbox: cannot print JSON: {e}"),
    }
}

/// Prints a reply: pretty JSON with `--json`, else its rendering for people.
pub fn show<T: Serialize + ?Sized>(reply: &T, json: bool, human: impl FnOnce(&T) -> String) {
    if json {
        print_json(reply);
    } else {
        print!("{}", human(reply));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{CustomerRecord, IntentItem, TagRecord};

    #[test]
    fn monitor_items_render_as_one_readable_block_each() {
        let u = MonitorItem::Utterance(UtteranceItem {
            call: "c".into(),
            index: 3,
            leg: "customer".into(),
            start_secs: 1.5,
            end_secs: 3.25,
            text: "多少钱".into(),
            pii: vec![],
            intent: Some(IntentItem {
                label: "price_inquiry".into(),
                confidence: 0.912,
                top3: vec![],
                labels: vec!["price_inquiry".into(), "budget_concern".into()],
            }),
            emotion: Some("neutral".into()),
            phase: "needs_discovery".into(),
            rules: vec!["r1".into()],
            latency: None,
        });
        let line = monitor_item(&u, Some(0.8));
        for part in [
            "1.50",
            "3.25",
            "customer",
            "多少钱",
            "price_inquiry+budget_concern 0.91",
            "needs_discovery",
            "r1",
            "+0.80 s",
        ] {
            assert!(line.contains(part), "{part} missing from {line}");
        }
        let e = MonitorItem::Event(EventItem {
            call: "c".into(),
            kind: "dnc_request".into(),
            rule: "customer_do_not_call".into(),
            reason: "customer asked not to be called".into(),
            at_secs: 48.3,
            utterances: vec![11],
        });
        assert!(monitor_item(&e, None).starts_with(">>> EVENT dnc_request at 48.3 s  rule customer_do_not_call"));
        let tag = TagRecord { tag: "feature_oriented".into(), first_unix_ms: 1, last_unix_ms: 2, calls: 2 };
        let f = MonitorItem::CallFinished(CallFinishedItem {
            call: "c".into(),
            utterances: 13,
            rule_hits: 5,
            events: 4,
            phase: "closing".into(),
            tags: vec!["feature_oriented".into()],
            customer: Some(CustomerRecord {
                customer: "ab12".into(),
                first_unix_ms: 1,
                last_unix_ms: 2,
                calls: 2,
                tags: vec![tag],
            }),
        });
        let line = monitor_item(&f, None);
        assert!(
            line.contains("tags [feature_oriented]") && line.contains("customer ab12 (2 calls): [feature_oriented ×2]"),
            "{line}"
        );
    }
}
