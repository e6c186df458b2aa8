"""extract_code / latest_code on realistic OTP SMS and numbers that are not codes."""

from __future__ import annotations

import pytest

from providers.otp import extract_code, latest_code

# (sms text, expected code); grouped by what each row exercises.
CASES: list[tuple[str, str | None]] = [
    # --- plain codes and formats ---
    ("123456", "123456"),
    ("Your code: 123 456", "123456"),
    ("Your WhatsApp code 123-456", "123456"),
    ("Your WhatsApp code: 671 094.", "671094"),
    ("<#> 1234 is your code. zniHFS3HBXG", "1234"),
    ("<#> Your Shopee code is 483920 FA+9qCX9VSu", "483920"),
    ("G-123456 is your Google verification code.", "123456"),
    ("FB-12345 is your Facebook confirmation code", "12345"),
    ("Telegram code 12345", "12345"),
    ("Telegram code: 54321\n\nYou can also tap on this link to log in:", "54321"),
    ("Your Uber code: 4821. Never share this code.", "4821"),
    ("Your Microsoft account security code is 12345678", "12345678"),
    ("Use 9912 as your PIN to sign in", "9912"),
    ("Your one-time passcode is 882211", "882211"),
    ("2019 is your Instagram code. Don't share it.", "2019"),
    ("Amazon: 583920 is your OTP. Do not share it with anyone.", "583920"),
    ("Your TikTok verification code is 738291", "738291"),
    ("Your code is ０１２３４５", "012345"),
    # --- Vietnamese ---
    ("Ma xac thuc cua ban la 486460", "486460"),
    ("Mã OTP: 4864", "4864"),
    ("Mã xác thực Zalo của bạn là 7351. Không chia sẻ mã này.", "7351"),
    ("[Shopee] Ma xac minh cua ban la 250117. Co hieu luc trong 15 phut.", "250117"),
    ("MoMo: Ma OTP 837461 het han sau 5 phut. Tuyet doi KHONG cung cap.", "837461"),
    ("Nhap ma 5567 ngay de kich hoat tai khoan", "5567"),
    ("VCB: Ma OTP 493817 dung de xac thuc GD so tien 2.500.000 VND", "493817"),
    # --- Russian ---
    ("Код: 5821", "5821"),
    ("Ваш код подтверждения 1234", "1234"),
    ("Никому не говорите код 837261! Yandex", "837261"),
    ("VK: 194837 — ваш код для входа. Действует 10 минут.", "194837"),
    ("Пароль: 7730. Не сообщайте его никому, даже сотрудникам банка.", "7730"),
    # --- Chinese ---
    ("验证码：845712", "845712"),
    ("您的验证码是 384920，5分钟内有效", "384920"),
    ("【美团】验证码8824，请勿泄露。", "8824"),
    ("【淘宝】您的校验码为627381，10分钟内有效。", "627381"),
    # --- Lao, Thai, Indonesian ---
    ("ລະຫັດຢືນຢັນຂອງທ່ານແມ່ນ 123456", "123456"),
    ("ລະຫັດ OTP ຂອງທ່ານ: 8842 ໃຊ້ໄດ້ 5 ນາທີ", "8842"),
    ("รหัส OTP ของคุณคือ 482910 (Ref: ABCD) ใช้ได้ภายใน 5 นาที", "482910"),
    ("รหัสยืนยัน LINE ของคุณคือ 6019", "6019"),
    ("Kode verifikasi Anda adalah 729104. Berlaku 5 menit.", "729104"),
    ("JANGAN BERIKAN kode ini ke siapapun. Kode OTP Gojek: 4417", "4417"),
    # --- traps: the code must be found despite a decoy ---
    ("Ngay 12/05/2024 ma OTP cua ban la 9031", "9031"),
    ("2024-05-12 10:30 Your code is 6677", "6677"),
    ("So du 100.000 VND. Ma xac nhan 4410", "4410"),
    ("Nap 50,000d thanh cong. Ma OTP: 781234", "781234"),
    ("Thanh toan 150000 VND. Ma OTP 7710", "7710"),
    ("Payment of $1250 approved. Code 3390", "3390"),
    ("Paid $12.50 at STARBUCKS. Your code is 6060", "6060"),
    ("Your Discord code is 4512. It expires in 10 minutes.", "4512"),
    ("Оплата 1 500 руб. Код 4455", "4455"),
    ("Оплата 1500 руб. Код подтверждения: 8812", "8812"),
    ("Don hang 12345678 cua ban dang cho xac nhan, ma OTP 4321", "4321"),
    ("Order #98765432 confirmed. Your verification code is 5512", "5512"),
    ("Ma OTP 6612. Hotline 1900 1234", "6612"),
    ("Lien he tong dai 19001234 neu can ho tro. Ma OTP: 2468", "2468"),
    ("Goi 18001090. Ma xac thuc: 1357", "1357"),
    ("Ma OTP cua ban la 112233, het han sau 1440 phut", "112233"),
    ("+84987654321: ma cua ban 5566", "5566"),
    ("Your code is 8820. Reply from 0987654321", "8820"),
    ("Tel +84 987 654 321. Code 7070", "7070"),
    ("Ma GD 20240512, ma OTP 9090", "9090"),
    ("TK 0123 so du 1500. Ma OTP 2580", "2580"),
    ("Ma OTP 3141 đã được gửi tới số 0987654321", "3141"),
    ("Code 271828 5 phut", "271828"),
    ("Nhập mã 7788 để xác nhận giao dịch 5.000.000đ", "7788"),
    ("Ma\u0303 OTP: 6543", "6543"),  # decomposed "mã", as some phones send it
    ("BIDV: nhap ma OTP 847362. Het han luc 10:30:00 12/05/2024", "847362"),
    # --- traps: nothing here is a code ---
    ("Ngay 12.05.2024 luc 10:30", None),
    ("Ban da nap 100.000 VND vao tai khoan", None),
    ("Goi tong dai 1900 1234 de duoc ho tro", None),
    ("Hotline: 19001234", None),
    ("Call 0987654321 or +84987654321", None),
    ("Don hang 12345678 da duoc giao thanh cong", None),
    ("Khuyen mai 50% cho 500 khach hang dau tien", None),
    ("Thanh toan 25000 VND thanh cong", None),
    ("Счет 40817810 пополнен на 1500 руб", None),
    ("STK 12345678 so du 1000", None),
    ("Ma GD 20240512 thanh cong", None),
    # Letter-mixed codes are out of scope: only a 4-8 digit group counts.
    ("Use code A1B2C3", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_extract_code(text: str, expected: str | None) -> None:
    assert extract_code(text) == expected


def test_case_table_is_broad() -> None:
    assert len(CASES) >= 45
    assert len({text for text, _ in CASES}) == len(CASES)


# latest_code: messages come oldest-first; the NEWEST message that HAS a code wins,
# so a trailing message without one (an ad, a "welcome") falls back to the one before.
LATEST_CASES: list[tuple[list[str], str | None]] = [
    (["Your code is 1111", "Your code is 2222"], "2222"),
    (["Ma OTP 1111", "Ma OTP 2222", "Ma OTP 3333"], "3333"),
    (["Telegram code 12345", "Welcome to Telegram!"], "12345"),
    (["Код: 5821", "Оплата 1500 руб", "Спасибо за регистрацию"], "5821"),
    (["Ma OTP 4321", "Hotline 1900 1234"], "4321"),
    (["Welcome!", "No code here"], None),
    ([], None),
]


@pytest.mark.parametrize(("texts", "expected"), LATEST_CASES)
def test_latest_code(texts: list[str], expected: str | None) -> None:
    assert latest_code(texts) == expected


def test_latest_code_accepts_tuple() -> None:
    assert latest_code(("G-111111 is your code", "G-222222 is your code")) == "222222"
