#!/usr/bin/env bash
# Independent test vectors for the channel signature layer (gateway/src/channels/).
#
# The Rust unit tests in gateway/src/channels/{alipay,wechatpay,supplier}.rs embed the values
# this script PRINTS, so that the Rust code is checked against another implementation and not
# only against itself:
#   - RSA-SHA256 (PKCS#1 v1.5, deterministic) signatures: `openssl dgst -sha256 -sign`;
#   - HMAC-SHA256: `openssl dgst -sha256 -hmac`;
#   - AES-256-GCM: the openssl command line cannot do AEAD modes (`openssl enc` refuses
#     them), so python3's `cryptography` package does it, from a throwaway venv under /tmp
#     when the package is not already importable.
# The Alipay signing strings are built here with `LC_ALL=C sort`, independently of the Rust
# code that builds them.
#
# Usage: scripts/gen-signature-vectors.sh [--regenerate-keys]
#   Without the flag the existing keys in gateway/tests/fixtures/keys/ are used (and created
#   if missing). With it, new keys are generated: the printed signatures then change and the
#   constants in the unit tests must be updated from this script's output.
#
# The keys are TEST-ONLY: they are public in this repository and must never be configured for
# a real channel.
set -euo pipefail
cd "$(dirname "$0")/.."

keys=gateway/tests/fixtures/keys
merchant="$keys/test-only-merchant-rsa2048.pkcs8.pem"
merchant_pub="$keys/test-only-merchant-rsa2048.spki.pem"
platform="$keys/test-only-platform-rsa2048.pkcs1.pem"
platform_pub="$keys/test-only-platform-rsa2048.spki.pem"

if [ "${1:-}" = "--regenerate-keys" ] || [ ! -f "$merchant" ] || [ ! -f "$platform" ]; then
  mkdir -p "$keys"
  # The merchant's own key (Alipay app key, WeChat Pay merchant API key): PKCS#8.
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$merchant" 2>/dev/null
  # The channel's key (Alipay public key, WeChat Pay platform key): the traditional PKCS#1
  # form, so that both private-key encodings are exercised.
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 2>/dev/null |
    openssl rsa -traditional -out "$platform" 2>/dev/null
  openssl pkey -in "$merchant" -pubout -out "$merchant_pub"
  openssl pkey -in "$platform" -pubout -out "$platform_pub"
  chmod 644 "$keys"/*.pem # test-only keys, readable like the rest of the checkout
  echo "# generated new test keys in $keys" >&2
fi

# base64 of RSA-SHA256 (PKCS#1 v1.5) over stdin, with the given private key.
rsa_sha256() { openssl dgst -sha256 -sign "$1" | base64 -w0; }
# The Alipay signing string of "k=v" lines on stdin: empty values dropped, sorted by name
# (byte order), joined with '&'. (`sign` is never in the lists below; `sign_type` is dropped
# by the callback's caller.)
alipay_content() { grep -v '=$' | LC_ALL=C sort -t= -k1,1 | paste -sd'&' | tr -d '\n'; }

echo "== Alipay request (alipay.trade.precreate), signed with the merchant key"
request_params='app_id=2021000000000001
method=alipay.trade.precreate
format=JSON
charset=utf-8
sign_type=RSA2
timestamp=2024-05-01 20:00:00
version=1.0
notify_url=https://gateway.example.com/v1/callbacks/alipay/ali-main
app_auth_token=
biz_content={"out_trade_no":"att_01HX7Z3K9Q2W","total_amount":"88.88","subject":"Top-up 充值 & more","timeout_express":"15m"}'
content=$(printf '%s\n' "$request_params" | alipay_content)
printf 'content:   %s\n' "$content"
printf 'signature: %s\n' "$(printf '%s' "$content" | rsa_sha256 "$merchant")"

echo "== Alipay callback (TRADE_SUCCESS), signed with the platform (Alipay) key; sign_type is not signed"
notify_params='notify_id=2024050100222200000012345678
notify_type=trade_status_sync
notify_time=2024-05-01 20:01:02
app_id=2021000000000001
charset=utf-8
version=1.0
trade_no=2024050122001400000000000001
out_trade_no=att_01HX7Z3K9Q2W
total_amount=88.88
receipt_amount=88.88
buyer_logon_id=abc***@example.com
subject=Top-up 充值 & more
trade_status=TRADE_SUCCESS
gmt_payment=2024-05-01 20:01:01
fund_bill_list=[{"amount":"88.88","fundChannel":"ALIPAYACCOUNT"}]
sign_type=RSA2'
content=$(printf '%s\n' "$notify_params" | grep -v '^sign_type=' | alipay_content)
printf 'content:   %s\n' "$content"
printf 'signature: %s\n' "$(printf '%s' "$content" | rsa_sha256 "$platform")"

echo "== Alipay response (alipay.trade.precreate): the exact text of the response object, platform key"
# The escaped slashes and the brace inside a string are deliberate: the verifier must sign-check
# the text as sent, not a re-serialization.
response_object='{"code":"10000","msg":"Success","out_trade_no":"att_01HX7Z3K9Q2W","qr_code":"https:\/\/qr.alipay.com\/bax08431pqrs}0e5a"}'
printf 'object:    %s\n' "$response_object"
printf 'signature: %s\n' "$(printf '%s' "$response_object" | rsa_sha256 "$platform")"

# A message is its lines, each ended by '\n': `printf '%s\n' LINE...` builds exactly that.
echo "== WeChat Pay request: GET query with ?mchid= (URL line = path?query), empty body, merchant key"
printf 'signature: %s\n' "$(printf '%s\n' GET \
  '/v3/pay/transactions/out-trade-no/att_01HX7Z3K9Q2W?mchid=1900000109' \
  1714564800 593BEC0C930BF1AFEB40B4A08C8FB242 '' | rsa_sha256 "$merchant")"

echo "== WeChat Pay request: POST native order, merchant key"
order_body='{"appid":"wxd678efh567hg6787","mchid":"1900000109","description":"Top-up","out_trade_no":"att_01HX7Z3K9Q2W","time_expire":"2024-05-01T20:15:00+08:00","notify_url":"https://gateway.example.com/v1/callbacks/wechatpay/wx-main","amount":{"total":8888,"currency":"CNY"}}'
printf 'body:      %s\n' "$order_body"
printf 'signature: %s\n' "$(printf '%s\n' POST /v3/pay/transactions/native \
  1714564800 C0FFEE0123456789ABCDEF0123456789 "$order_body" | rsa_sha256 "$merchant")"

echo "== WeChat Pay reply/callback: TIMESTAMP, NONCE, BODY lines, platform key"
reply_body='{"code_url":"weixin://wxpay/bizpayurl?pr=aIQrOYOzz"}'
printf 'body:      %s\n' "$reply_body"
printf 'signature: %s\n' "$(printf '%s\n' 1714564801 fdasfjihihihlkja484w "$reply_body" |
  rsa_sha256 "$platform")"

echo "== WeChat Pay callback resource: AEAD_AES_256_GCM (python3 cryptography; openssl enc cannot do GCM)"
py=python3
if ! python3 -c 'import cryptography' 2>/dev/null; then
  venv=$(mktemp -d /tmp/gen-vectors-venv.XXXXXX)
  trap 'rm -rf "$venv"' EXIT
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q cryptography
  py="$venv/bin/python"
fi
"$py" - <<'EOF'
import base64
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
key = b"TestOnlyApiV3Key0123456789abcdef"  # 32 ASCII bytes, as a merchant sets it
nonce = b"fdasflkja484"                    # 12 bytes, as WeChat Pay sends it
aad = b"transaction"
plaintext = ('{"mchid":"1900000109","appid":"wxd678efh567hg6787","out_trade_no":"att_01HX7Z3K9Q2W",'
             '"transaction_id":"4200000000202405010000000001","trade_state":"SUCCESS",'
             '"amount":{"total":8888,"currency":"CNY","payer_total":8888,"payer_currency":"CNY"}}').encode()
ct = AESGCM(key).encrypt(nonce, plaintext, aad)  # ciphertext || 16-byte tag
print("plaintext: " + plaintext.decode())
print("ciphertext:", base64.b64encode(ct).decode())
EOF

echo "== Supplier X-Signature: HMAC-SHA256(secret, \"<t>.<body>\")"
secret='whsec_test_only_supplier_0123456789'
t=1714564800
callback_body='{"order_id":"att_01HX7Z3K9Q2W","supplier_order_id":"S-20240501-0001","status":"succeeded","amount":"88.88","currency":"CNY"}'
printf 'body:      %s\n' "$callback_body"
mac=$(printf '%s.%s' "$t" "$callback_body" | openssl dgst -sha256 -hmac "$secret" -r | cut -d' ' -f1)
printf 'header:    t=%s,v1=%s\n' "$t" "$mac"
