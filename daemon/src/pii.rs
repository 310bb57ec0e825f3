//! Personal data in transcripts: found and masked before anything is stored or sent.
//!
//! Digit strings are read the way ASR writes them: ASCII or full-width digits, or Chinese
//! numerals spoken one by one (幺三八…, 一三八…, 零/〇/洞 for 0, 两 for 2), with spaces,
//! commas or dashes between groups. A string is labelled by what it validates as:
//! resident ID (18 characters, ISO 7064 MOD 11-2 check), mobile (11 digits, 1[3-9]…,
//! optionally +86), bank card (16–19 digits, Luhn), landline (0 + area code, 10–12 digits;
//! 400/800 service numbers; bare 7–8 digit local numbers). Any other string of 7 or more
//! digits is masked as `[数字]`: ASR garbles digits, and a mistyped ID number is still
//! personal data. Shorter strings (amounts, times) stay. E-mail addresses are masked too.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    ResidentId,
    BankCard,
    Mobile,
    Landline,
    Email,
    /// A long digit string that validates as nothing above.
    Digits,
}

impl PiiKind {
    /// What replaces the text: the type survives, the value does not.
    pub fn mask(self) -> &'static str {
        match self {
            Self::ResidentId => "[身份证]",
            Self::BankCard => "[银行卡]",
            Self::Mobile => "[手机号]",
            Self::Landline => "[座机]",
            Self::Email => "[邮箱]",
            Self::Digits => "[数字]",
        }
    }
}

/// One finding: byte range in the original text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PiiSpan {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}

/// Shortest digit string that is masked at all.
const MIN_MASKED_DIGITS: usize = 7;

/// The digit a character stands for in a spoken or written number; 10 for the ID's X.
fn digit_of(c: char) -> Option<u8> {
    Some(match c {
        '0'..='9' => c as u8 - b'0',
        '０'..='９' => (c as u32 - '０' as u32) as u8,
        '零' | '〇' | '洞' => 0,
        '幺' | '一' => 1,
        '二' | '两' => 2,
        '三' => 3,
        '四' => 4,
        '五' => 5,
        '六' => 6,
        '七' => 7,
        '八' => 8,
        '九' => 9,
        _ => return None,
    })
}

fn is_separator(c: char) -> bool {
    matches!(c, ' ' | '-' | ',' | '，' | '、' | '\u{3000}')
}

/// Finds every personal-data span, in text order, without overlaps.
pub fn find(text: &str) -> Vec<PiiSpan> {
    let emails = find_emails(text);
    // Numbers are looked for in the text with the e-mails blanked out (same byte offsets),
    // not dropped when they overlap one: "555 0101 1111@x.cn" must still mask "555 0101",
    // which masking the e-mail alone would leave in clear (the fuzzer found it: a second
    // pass then masked more than the first).
    let mut blanked = text.as_bytes().to_vec();
    for e in &emails {
        blanked[e.start..e.end].fill(b'#');
    }
    // Spans start and end on char boundaries, so this is UTF-8; the filter keeps the
    // spans apart whatever happens.
    let blanked = String::from_utf8(blanked).unwrap_or_else(|_| text.to_owned());
    let numbers: Vec<PiiSpan> = find_numbers(&blanked)
        .into_iter()
        .filter(|n| !emails.iter().any(|e| n.start < e.end && e.start < n.end))
        .collect();
    let mut spans = [emails, numbers].concat();
    spans.sort_by_key(|s| s.start);
    spans
}

/// The text with every span replaced by its type's mask, and the kinds found.
pub fn mask(text: &str) -> (String, Vec<PiiKind>) {
    let spans = find(text);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for s in &spans {
        out.push_str(&text[at..s.start]);
        out.push_str(s.kind.mask());
        at = s.end;
    }
    out.push_str(&text[at..]);
    (out, spans.iter().map(|s| s.kind).collect())
}

fn find_numbers(text: &str) -> Vec<PiiSpan> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if digit_of(chars[i].1).is_none() && !is_plus_86(&chars, i) {
            i += 1;
            continue;
        }
        // A run: digits, single separators between digits, an ID's final X.
        let start = chars[i].0;
        let mut digits: Vec<u8> = Vec::new();
        let mut j = i;
        if is_plus_86(&chars, j) {
            j += 1; // the '+': "+86" is read as digits 8, 6
        }
        let mut end = start;
        while j < chars.len() {
            let c = chars[j].1;
            if let Some(d) = digit_of(c) {
                digits.push(d);
                end = chars[j].0 + c.len_utf8();
                j += 1;
            } else if matches!(c, 'X' | 'x') && digits.len() == 17 {
                digits.push(10);
                end = chars[j].0 + c.len_utf8();
                j += 1;
                break;
            } else if is_separator(c) && j + 1 < chars.len() && digit_of(chars[j + 1].1).is_some() && !digits.is_empty()
            {
                j += 1;
            } else {
                break;
            }
        }
        if let Some(kind) = classify(&digits) {
            out.push(PiiSpan { kind, start, end });
        }
        i = j.max(i + 1);
    }
    out
}

fn is_plus_86(chars: &[(usize, char)], i: usize) -> bool {
    chars[i].1 == '+' && chars.get(i + 1).is_some_and(|c| c.1 == '8') && chars.get(i + 2).is_some_and(|c| c.1 == '6')
}

fn classify(d: &[u8]) -> Option<PiiKind> {
    let n = d.len();
    if n < MIN_MASKED_DIGITS {
        return None;
    }
    if n == 18 && resident_id_valid(d) {
        return Some(PiiKind::ResidentId);
    }
    if d.contains(&10) {
        return Some(PiiKind::Digits);
    }
    let mobile = |m: &[u8]| m.len() == 11 && m[0] == 1 && (3..=9).contains(&m[1]);
    if mobile(d) || (n == 13 && d[..2] == [8, 6] && mobile(&d[2..])) {
        return Some(PiiKind::Mobile);
    }
    if (16..=19).contains(&n) && luhn_valid(d) {
        return Some(PiiKind::BankCard);
    }
    let service = n == 10 && (d[..3] == [4, 0, 0] || d[..3] == [8, 0, 0]);
    if (d[0] == 0 && (10..=12).contains(&n)) || service || (7..=8).contains(&n) {
        return Some(PiiKind::Landline);
    }
    Some(PiiKind::Digits)
}

/// GB 11643: weights 2^(17-i) mod 11, check character "10X98765432"[sum mod 11].
pub fn resident_id_valid(d: &[u8]) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: [u8; 11] = [1, 0, 10, 9, 8, 7, 6, 5, 4, 3, 2];
    if d.len() != 18 || d[..17].iter().any(|&x| x > 9) {
        return false;
    }
    let sum: u32 = d[..17].iter().zip(WEIGHTS).map(|(&x, w)| u32::from(x) * w).sum();
    CHECK[(sum % 11) as usize] == d[17]
}

pub fn luhn_valid(d: &[u8]) -> bool {
    if d.iter().any(|&x| x > 9) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let doubled = x * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                x
            }
        })
        .sum();
    sum % 10 == 0
}

fn find_emails(text: &str) -> Vec<PiiSpan> {
    let bytes = text.as_bytes();
    let local = |b: u8| b.is_ascii_alphanumeric() || b"._%+-".contains(&b);
    let domain = |b: u8| b.is_ascii_alphanumeric() || b == b'.' || b == b'-';
    let mut out = Vec::new();
    for (at, _) in text.match_indices('@') {
        // Addresses run together ("a@b.cn.c@d.cn"): the next one starts where the last ended.
        let floor = out.last().map_or(0, |s: &PiiSpan| s.end);
        let mut start = at;
        while start > floor && local(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = at + 1;
        while end < bytes.len() && domain(bytes[end]) {
            end += 1;
        }
        // The host ends with its top-level domain: the letters right after a dot, taken from
        // the right. ASR joins what follows ("x@y.com123", "x@y.cnO6222…"): what comes
        // after the TLD must not hide the address (the fuzzer found that masking the tail
        // then revealed it to a second pass).
        let run = &text[at + 1..end];
        let host_len = run.match_indices('.').rev().find_map(|(dot, _)| {
            let tld = run[dot + 1..].bytes().take_while(u8::is_ascii_alphabetic).count();
            (dot > 0 && tld >= 2).then_some(dot + 1 + tld)
        });
        let tld_ok = host_len.is_some();
        let end = at + 1 + host_len.unwrap_or(0);
        if start < at && tld_ok && start >= floor {
            out.push(PiiSpan { kind: PiiKind::Email, start, end });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_twice_changes_nothing_found_by_the_fuzzer() {
        let text = "Hoh doest1 *11a555 01011 1111@1111.hTs\tka";
        let (once, _) = mask(text);
        assert_eq!(mask(&once).0, once, "the first pass left personal data: {once}");
        assert!(!once.contains("555 01011"), "{once}");
        let text = "How m1 1110W@W111.AAAAA1 111 111111 1111WWWHow @W1m10.";
        let (once, _) = mask(text);
        assert_eq!(mask(&once).0, once, "the first pass left personal data: {once}");
        assert_eq!(mask("mail x@y.com123 now").0, "mail [邮箱]123 now");
        let (once, _) = mask("ska&@[邮箱].@1o.Thhm");
        assert_eq!(mask(&once).0, once);
        assert_eq!(mask("x@b.cn.y@d.cn").0, "[邮箱][邮箱]", "addresses run together");
        let (once, _) = mask("0@1o.ThWWWWWWWWWWWW6222000000000000O1234567O7654321");
        assert_eq!(mask(&once).0, once);
        assert!(once.starts_with("[邮箱]"), "{once}");
    }

    fn masked(text: &str) -> String {
        mask(text).0
    }

    #[test]
    fn resident_ids_are_labelled_only_with_a_valid_check_character() {
        // 11010519491231002X is the standard's own example; the last digit below is wrong.
        assert!(resident_id_valid(&"11010519491231002".bytes().map(|b| b - b'0').chain([10]).collect::<Vec<_>>()));
        assert_eq!(masked("我的身份证是11010519491231002X。"), "我的身份证是[身份证]。");
        assert_eq!(masked("身份证号 110105194912310021"), "身份证号 [数字]", "bad check: masked, not labelled");
        assert_eq!(masked("号码是11010519491231002x"), "号码是[身份证]");
    }

    #[test]
    fn bank_cards_pass_luhn_and_mobiles_have_their_prefixes() {
        assert!(luhn_valid(&[4, 5, 3, 9, 1, 4, 8, 8, 0, 3, 4, 3, 6, 4, 6, 7]));
        assert_eq!(masked("card 4539 1488 0343 6467 ok"), "card [银行卡] ok");
        assert_eq!(masked("card 4539 1488 0343 6468 ok"), "card [数字] ok", "Luhn fails");
        assert_eq!(masked("手机13812345678，打给我"), "手机[手机号]，打给我");
        assert_eq!(masked("call +86 138-1234-5678"), "call [手机号]");
        assert_eq!(masked("12812345678"), "[数字]", "no mobile starts with 12");
    }

    #[test]
    fn spoken_chinese_numerals_are_read_as_digits() {
        assert_eq!(masked("我的电话是幺三八幺二三四五六七八"), "我的电话是[手机号]");
        assert_eq!(masked("一三八，一二三四，五六七八，记一下"), "[手机号]，记一下");
        assert_eq!(masked("座机零幺零 六二七八 九零一二"), "座机[座机]");
        assert_eq!(masked("热线四零零八八八六六六六"), "热线[座机]");
    }

    #[test]
    fn ordinary_numbers_and_words_stay() {
        for text in ["一下子就好了", "三百块", "2024年5月", "价格是998元", "一二三四五六", "第一二次"]
        {
            assert_eq!(masked(text), text);
        }
        assert_eq!(masked("分机8812345"), "分机[座机]", "7 digits: a local number");
    }

    #[test]
    fn emails_are_masked_and_kinds_reported_in_order() {
        let (text, kinds) = mask("发到 wang.li+crm@example.com.cn 或者打13912345678");
        assert_eq!(text, "发到 [邮箱] 或者打[手机号]");
        assert_eq!(kinds, vec![PiiKind::Email, PiiKind::Mobile]);
        assert_eq!(masked("at @ home, a@b, x@y.z9"), "at @ home, a@b, x@y.z9");
        assert_eq!(masked("mail bob@mail.example.org."), "mail [邮箱].");
    }
}
