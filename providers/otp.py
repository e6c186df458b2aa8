"""Find the one-time code in an SMS text.

Real OTP messages mix the code with dates, amounts, phone numbers, validity periods,
order numbers and SMS-retriever hashes. We collect every standalone 4-8 digit group
(or a 6-digit code split as ``123 456`` / ``123-456``), throw away the groups whose
surroundings show they are something else, then prefer the one closest to a code
keyword ("code", "mã", "код", "验证码", ...). With no keyword nearby, the first
surviving group wins, since senders put the code up front.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

# A candidate: a 6-digit code written "123 456"/"123-456", or a plain 4-8 digit run.
# ASCII letters/digits must not touch it, which rejects longer numbers (phones such as
# 0987654321), app hashes (zniHFS3HBXG) and amounts glued to a unit (50000d).
# Non-Latin letters may touch it: Chinese, Thai and Lao write "验证码845712".
_CANDIDATE = re.compile(
    r"(?<![0-9A-Za-z])(?:([0-9]{3})[ -]([0-9]{3})|([0-9]{4,8}))(?![0-9A-Za-z])"
)

# "G-123456", "FB-12345": the sender tag makes the digits a code on its own.
_SENDER_TAG = re.compile(r"(?<![0-9A-Za-z])[A-Z]{1,3}-$")

# Words that sit next to the code. Latin/Cyrillic ones need word boundaries ("ma"
# must not fire inside "mama"); CJK, Thai and Lao write without spaces, so not there.
_KEYWORD = re.compile(
    r"\b(?:(?:pass)?codes?|otp|pin|kode|m[aã]|код\w{0,2}|пароль)\b"
    r"|验证码|校验码|动态码|确认码|รหัส|ລະຫັດ",
    re.IGNORECASE,
)
_KEYWORD_BEFORE_CHARS = 40  # "Ma xac thuc cua ban la 486460": the keyword leads
_KEYWORD_AFTER_CHARS = 30  # "1234 is your code": the keyword trails

# The group is one piece of a bigger number: a date (12.05.2024, 2024-05-12), a time,
# a decimal or grouped amount (100.000, 1250,50) or an international phone (+84...).
_JOINED_BEFORE = re.compile(r"(?:[0-9][.,:/-]|\+[0-9]{0,3}\)?[ .-]?)$")
_JOINED_AFTER = re.compile(r"[.,:/-][0-9]")
# A run of space-separated groups is a phone or hotline ("0987 654 321",
# "1900 1234"). A 6-digit code is split once, so a split candidate with any digit
# neighbour is not a code; a plain one only when the neighbour is a 3+ digit group,
# so "123456 5 phut" survives.
_SPACED_BEFORE = re.compile(r"[0-9]{3} $")
_SPACED_AFTER = re.compile(r" [0-9]{3}")
_SPLIT_SPACED_BEFORE = re.compile(r"[0-9] $")
_SPLIT_SPACED_AFTER = re.compile(r" [0-9]")

# Money: "5000 VND", "150 000đ", "$1250", "Rp 25000", "1500 руб".
_CURRENCY_AFTER = re.compile(
    r"\s?(?:(?:vnđ|vnd|đồng|dong|đ|usd|eur|руб\w*|rub|thb|idr|rupiah|kip)(?!\w)"
    r"|[₫$€£¥₽]|р\.|元|円|บาท|ກີບ)",
    re.IGNORECASE,
)
_CURRENCY_BEFORE = re.compile(
    r"(?:[$€£¥₫₽]|(?<![A-Za-z])(?:usd|eur|vnd|rp\.?|idr|rub|thb))\s?$", re.IGNORECASE
)

# Validity periods: "1440 phut", "3600 seconds", "10分钟". Words that also mean
# something else next to a code ("ngay" = "now" in "nhap ma 1234 ngay") stay out.
_DURATION_AFTER = re.compile(
    r"\s?(?:(?:phút|phut|giây|giay|min(?:ute)?s?|sec(?:ond)?s?|hours?|days?|menit"
    r"|detik|мин\w*|сек\w*|час\w*)(?!\w)|分钟|秒|小时|นาที|วินาที|ນາທີ)",
    re.IGNORECASE,
)

# A label right before the number says what it is: an order/transaction/reference
# number, an account or balance, or a phone to call. Only filler may sit between
# label and number ("Order No. 12345678", "goi den 1900 1234"); a code keyword in
# that gap breaks the label ("order code 1234" is a code).
_LABEL = re.compile(
    r"(?:\b(?:đơn hàng|don hang|giao dịch|giao dich|tham chiếu|tham chieu|hóa đơn"
    r"|hoa don|gd|order|invoice|ref|reference|transaction|txn|tracking|account|acc|stk"
    r"|số dư|so du|balance|amount|баланс|сумма|saldo"
    r"|tài khoản|tai khoan|hotline|tổng đài|tong dai|gọi|goi|call|liên hệ|lien he"
    r"|lh|cskh|tel|phone|sđt|sdt|заказ\w*|счет\w*|счёт\w*|тел\w*|звоните|pesanan"
    r"|hubungi)\b|订单|客服|热线|电话)"
    r"(?P<gap>[^0-9\n]{0,16})$",
    re.IGNORECASE,
)

_CONTEXT_CHARS = 48  # how far around a candidate the context checks look
_FULLWIDTH_DIGITS = str.maketrans("０１２３４５６７８９", "0123456789")


def extract_code(text: str) -> str | None:
    """The verification code in ``text``, digits only, or None when there is none."""
    # NFC so "mã" matches whether the phone sent it composed or decomposed; full-width
    # digits (Chinese IMEs) become ASCII. Full-width punctuation is kept on purpose:
    # "384920，5分钟" must not look like the decimal 384920,5.
    text = unicodedata.normalize("NFC", text or "").translate(_FULLWIDTH_DIGITS)
    keywords = [m.span() for m in _KEYWORD.finditer(text)]
    best: tuple[int, int, str] | None = None  # (keyword distance, position, code)
    first: str | None = None
    for match in _CANDIDATE.finditer(text):
        start, end = match.span()
        split = match.group(3) is None
        code = match.group(1) + match.group(2) if split else match.group(3)
        before = text[max(0, start - _CONTEXT_CHARS) : start]
        after = text[end : end + _CONTEXT_CHARS]
        if _not_a_code(before, after, split):
            continue
        if first is None:
            first = code
        distance = _keyword_distance(keywords, start, end)
        if _SENDER_TAG.search(before):
            distance = 0
        if distance is not None and (best is None or (distance, start) < best[:2]):
            best = (distance, start, code)
    return best[2] if best is not None else first


def latest_code(texts: Sequence[str]) -> str | None:
    """The code of the newest message in ``texts`` (oldest-first) that has one."""
    # A newer message without a code (an ad, "thanks for registering") does not void
    # the code that came before it, so we keep walking back.
    for text in reversed(texts):
        code = extract_code(text)
        if code is not None:
            return code
    return None


def _not_a_code(before: str, after: str, split: bool) -> bool:
    """True when the context shows the digits are a date, amount, phone, etc."""
    if _JOINED_BEFORE.search(before) or _JOINED_AFTER.match(after):
        return True
    if split:
        if _SPLIT_SPACED_BEFORE.search(before) or _SPLIT_SPACED_AFTER.match(after):
            return True
    elif _SPACED_BEFORE.search(before) or _SPACED_AFTER.match(after):
        return True
    if _CURRENCY_BEFORE.search(before) or _CURRENCY_AFTER.match(after):
        return True
    if _DURATION_AFTER.match(after):
        return True
    label = _LABEL.search(before)
    return label is not None and not _KEYWORD.search(label.group("gap"))


def _keyword_distance(
    keywords: list[tuple[int, int]], start: int, end: int
) -> int | None:
    """Characters between the candidate and the nearest keyword in reach, or None."""
    distances = [
        start - k_end
        for k_start, k_end in keywords
        if k_end <= start and start - k_end <= _KEYWORD_BEFORE_CHARS
    ] + [
        k_start - end
        for k_start, k_end in keywords
        if k_start >= end and k_start - end <= _KEYWORD_AFTER_CHARS
    ]
    return min(distances, default=None)
