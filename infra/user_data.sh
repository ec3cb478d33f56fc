#!/bin/bash
# ClearIP proxy first-boot script (EC2 user data, rendered by infra/fleet.py).
# It fetches the proxy from the stack's CDK asset, runs deploy/install.sh (the same script a manual
# install uses) with the stack's settings, and signals CloudFormation: success only once the proxy
# listens on UDP and TCP 5060, failure otherwise, so a dead proxy fails the deployment.
# Log: /var/log/clearip-proxy-bootstrap.log
set -uo pipefail
exec >>/var/log/clearip-proxy-bootstrap.log 2>&1

STACK='@@STACK@@'
RESOURCE='@@RESOURCE@@'
REGION='@@REGION@@'
ASSET_URL='@@ASSET_URL@@'
ELASTIC_IP='@@ELASTIC_IP@@'
SIP_CIDRS='@@SIP_CIDRS@@'
CLEARIP_URI='@@CLEARIP_URI@@'
TIMEOUT='@@TIMEOUT@@'
LISTEN_WAIT='@@LISTEN_WAIT@@'

signal() {
  # $1: 0 success, else failure; $2: reason shown in the stack's events.
  /opt/aws/bin/cfn-signal --exit-code "$1" --reason "$2" \
    --stack "$STACK" --resource "$RESOURCE" --region "$REGION" || echo "cfn-signal failed" >&2
}
fail() {
  echo "bootstrap failed: $1" >&2
  signal 1 "$1"
  exit 1
}

imds() {
  # IMDSv2 only: a session token first, then the path.
  local token
  token=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \
    http://169.254.169.254/latest/api/token) || return 1
  curl -sf -H "X-aws-ec2-metadata-token: $token" "http://169.254.169.254/latest/meta-data/$1"
}

echo "== $(date -u +%FT%TZ) ClearIP proxy bootstrap"
dnf install -y -q python3.11 tcpdump openssl aws-cfn-bootstrap awscli-2 iproute \
  || fail "dnf install of python3.11, tcpdump, openssl, aws-cfn-bootstrap failed"

# The advertised address is the Elastic IP, read from the instance metadata (1:1 NAT: sockets bind
# the private address, Via/Record-Route/Contact carry this one). The EIP is associated with the
# network interface before the instance starts; wait briefly in case the metadata lags.
ADVERTISE=''
for _ in $(seq 30); do
  ADVERTISE=$(imds public-ipv4 || true)
  [ "$ADVERTISE" = "$ELASTIC_IP" ] && break
  sleep 2
done
[ "$ADVERTISE" = "$ELASTIC_IP" ] || fail "public IPv4 from IMDS is '$ADVERTISE', expected Elastic IP $ELASTIC_IP"
PROXY_ID=$(imds instance-id) || fail "no instance id from IMDS"

WORK=$(mktemp -d)
aws s3 cp --only-show-errors --region "$REGION" "$ASSET_URL" "$WORK/proxy.zip" \
  || fail "cannot download the proxy asset $ASSET_URL"
python3 -m zipfile -e "$WORK/proxy.zip" "$WORK/src" || fail "cannot unpack the proxy asset"

ALLOW_ARGS=()
IFS=',' read -r -a cidrs <<<"$SIP_CIDRS"
for c in "${cidrs[@]}"; do ALLOW_ARGS+=(--allow "$c"); done

bash "$WORK/src/deploy/install.sh" \
  --source "$WORK/src" \
  "${ALLOW_ARGS[@]}" \
  --advertise "$ADVERTISE" \
  --proxy-id "$PROXY_ID" \
  --clearip-uri "$CLEARIP_URI" \
  --timeout "$TIMEOUT" \
  --metrics cloudwatch \
  --aws-region "$REGION" \
  || fail "deploy/install.sh failed"
rm -rf "$WORK"

for _ in $(seq "$LISTEN_WAIT"); do
  if systemctl is-active --quiet clearip-proxy \
    && ss -Hlun 'sport = :5060' | grep -q . && ss -Hltn 'sport = :5060' | grep -q .; then
    signal 0 "clearip-proxy is listening on 5060 (advertising $ADVERTISE)"
    echo "== $(date -u +%FT%TZ) done"
    exit 0
  fi
  sleep 1
done
journalctl -u clearip-proxy --no-pager -n 50 || true
fail "clearip-proxy is not listening on 5060 after ${LISTEN_WAIT}s (journalctl -u clearip-proxy)"
