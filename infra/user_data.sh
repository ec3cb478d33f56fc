#!/bin/bash
# ClearIP proxy first-boot script (EC2 user data, rendered by infra/fleet.py).
# It reads the current release (the stack's code asset) and the site settings from the stack's SSM
# parameters, runs that release's deploy/install.sh (the same script every later deploy runs through
# the release association), and signals CloudFormation: success only once the proxy listens on UDP
# and TCP 5060, failure otherwise, so a dead proxy fails the deployment.
# It holds only values that never change for this instance: user data runs at first boot only.
# Log: /var/log/clearip-proxy-bootstrap.log
set -uo pipefail
exec >>/var/log/clearip-proxy-bootstrap.log 2>&1

STACK='@@STACK@@'
RESOURCE='@@RESOURCE@@'
REGION='@@REGION@@'
ELASTIC_IP='@@ELASTIC_IP@@'
RELEASE_PARAMETER='@@RELEASE_PARAMETER@@'
SETTINGS_PARAMETER='@@SETTINGS_PARAMETER@@'
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

parameter() {
  aws ssm get-parameter --region "$REGION" --name "$1" --query Parameter.Value --output text
}

echo "== $(date -u +%FT%TZ) ClearIP proxy bootstrap"
dnf install -y -q python3.11 tcpdump openssl aws-cfn-bootstrap awscli-2 iproute \
  || fail "dnf install of python3.11, tcpdump, openssl, aws-cfn-bootstrap failed"

PROXY_ID=$(imds instance-id) || fail "no instance id from IMDS"
WORK=$(mktemp -d)
RELEASE=$(parameter "$RELEASE_PARAMETER") || fail "cannot read $RELEASE_PARAMETER"
read -r ASSET_URL RELEASE_ID <<<"$RELEASE"
parameter "$SETTINGS_PARAMETER" >"$WORK/site.toml" || fail "cannot read $SETTINGS_PARAMETER"
aws s3 cp --only-show-errors --region "$REGION" "$ASSET_URL" "$WORK/proxy.zip" \
  || fail "cannot download the proxy asset $ASSET_URL"
python3.11 -m zipfile -e "$WORK/proxy.zip" "$WORK/src" || fail "cannot unpack the proxy asset"

# The advertised address is the Elastic IP (1:1 NAT: sockets bind the private address,
# Via/Record-Route/Contact carry this one). CloudFormation associates it once this instance has
# signalled, so it is passed in, not read from the metadata.
bash "$WORK/src/deploy/install.sh" \
  --source "$WORK/src" \
  --settings "$WORK/site.toml" \
  --release-id "$RELEASE_ID" \
  --offline \
  --advertise "$ELASTIC_IP" \
  --proxy-id "$PROXY_ID" \
  --aws-region "$REGION" \
  --wait "$LISTEN_WAIT" \
  || fail "deploy/install.sh failed (the proxy is not listening on 5060; journalctl -u clearip-proxy)"
rm -rf "$WORK"
signal 0 "clearip-proxy is listening on 5060 (advertising $ELASTIC_IP)"

# Until the Elastic IP arrives the instance's traffic leaves from a temporary public address, and the
# connection to ClearIP made from it dies when the address changes: once the metadata shows the
# Elastic IP, restart the proxy (no carrier can reach it before that) so it connects from its own.
for _ in $(seq 300); do
  if [ "$(imds public-ipv4 || true)" = "$ELASTIC_IP" ]; then
    systemctl restart clearip-proxy
    echo "== $(date -u +%FT%TZ) Elastic IP $ELASTIC_IP associated; proxy restarted from it"
    exit 0
  fi
  sleep 2
done
echo "warning: the Elastic IP $ELASTIC_IP did not arrive within 10 minutes" >&2
