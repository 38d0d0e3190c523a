#!/usr/bin/env bash
# Test helpers for the local Keycloak (deploy/local/stack.sh ensure keycloak), through its
# admin REST API with an admin-cli token from the master realm. Needs curl and jq.
#
# Usage: admin.sh user create NAME PASSWORD [ROLE...]  create (or re-create) a user of realm
#                                                      audit with these realm roles; prints its id
#        admin.sh user delete NAME
#        admin.sh token NAME PASSWORD [CLIENT_ID]      password grant (default client audit-cli);
#                                                      prints the access token
#        admin.sh key rotate                           add an RS256 signing key (component
#                                                      rsa-generated) above every other; prints its kid
#        admin.sh key list                             the realm's keys: kid, algorithm, use,
#                                                      priority, status, component id
#        admin.sh key remove KID                       delete the component that provides KID
#
# A user created here has first name NAME, last name "Test" (so `name` is "NAME Test") and
# e-mail NAME@audit.example. `user create` on an existing name deletes that user first, so a
# re-run of a test starts from the same state. Key rotation keeps the older keys: they stay
# in the JWKS and still verify the tokens they signed until `key remove`.
#
# Reads KEYCLOAK_URL, KEYCLOAK_REALM, KEYCLOAK_ADMIN_USERNAME, KEYCLOAK_ADMIN_PASSWORD and
# KEYCLOAK_CLI_CLIENT_ID from the environment; any that is unset comes from `stack.sh env`.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)

die() { printf 'admin.sh: %s\n' "$*" >&2; exit 1; }
usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

command -v curl >/dev/null || die "curl is required (apt-get install -y curl)"
command -v jq >/dev/null || die "jq is required (apt-get install -y jq)"

if [[ -z ${KEYCLOAK_URL:-} || -z ${KEYCLOAK_REALM:-} || -z ${KEYCLOAK_ADMIN_USERNAME:-} ||
    -z ${KEYCLOAK_ADMIN_PASSWORD:-} || -z ${KEYCLOAK_CLI_CLIENT_ID:-} ]]; then
    defaults=$("$SCRIPT_DIR/../stack.sh" env)
    # Only what is unset is taken from stack.sh, so a caller can point at another realm.
    while IFS= read -r line; do
        name=${line#export }
        name=${name%%=*}
        case $name in
            KEYCLOAK_URL | KEYCLOAK_REALM | KEYCLOAK_ADMIN_USERNAME | KEYCLOAK_ADMIN_PASSWORD | KEYCLOAK_CLI_CLIENT_ID)
                [[ -n ${!name:-} ]] || eval "$line" ;;
        esac
    done <<<"$defaults"
fi
URL=${KEYCLOAK_URL%/}
REALM=$KEYCLOAK_REALM
ADMIN="$URL/admin/realms/$REALM"

# curl that fails on HTTP errors and shows Keycloak's error body. Extra args pass through.
http() { # method url [curl args...]
    local method=$1 url=$2 out code
    shift 2
    out=$(mktemp)
    code=$(curl -sS --max-time 30 -o "$out" -w '%{http_code}' -X "$method" "$url" "$@") || {
        rm -f "$out"
        die "$method $url: no answer from Keycloak (stack.sh ensure keycloak?)"
    }
    if [[ $code != 2* ]]; then
        printf 'admin.sh: %s %s: HTTP %s: %s\n' "$method" "$url" "$code" "$(head -c 500 "$out")" >&2
        rm -f "$out"
        return 22
    fi
    cat "$out"
    rm -f "$out"
}

ADMIN_TOKEN=
admin_token() {
    [[ -n $ADMIN_TOKEN ]] && return
    ADMIN_TOKEN=$(http POST "$URL/realms/master/protocol/openid-connect/token" \
        -d grant_type=password -d client_id=admin-cli \
        --data-urlencode "username=$KEYCLOAK_ADMIN_USERNAME" \
        --data-urlencode "password=$KEYCLOAK_ADMIN_PASSWORD" | jq -r .access_token)
    [[ -n $ADMIN_TOKEN && $ADMIN_TOKEN != null ]] || die "no admin token from the master realm"
}

api() { # method path [curl args...]
    local method=$1 path=$2
    shift 2
    admin_token
    http "$method" "$ADMIN$path" -H "Authorization: Bearer $ADMIN_TOKEN" "$@"
}

user_id() { # name -> id or nothing (exact match)
    api GET "/users?exact=true&username=$(jq -rn --arg v "$1" '$v|@uri')" | jq -r '.[0].id // empty'
}

user_create() { # name password role...
    local name=$1 password=$2 id roles
    shift 2
    [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "user name '$name': use letters, digits, '.', '_' or '-'"
    id=$(user_id "$name")
    [[ -z $id ]] || api DELETE "/users/$id" >/dev/null
    # Roles first: an unknown role fails before the user exists.
    roles=$(for role in "$@"; do
        api GET "/roles/$(jq -rn --arg v "$role" '$v|@uri')" || die "realm $REALM has no role '$role'"
    done | jq -s .)
    api POST /users -H 'Content-Type: application/json' -d "$(jq -n --arg u "$name" --arg p "$password" '{
        username: $u, enabled: true, firstName: $u, lastName: "Test",
        email: ($u + "@audit.example"), emailVerified: true,
        credentials: [{type: "password", value: $p, temporary: false}]}')" >/dev/null
    id=$(user_id "$name")
    [[ -n $id ]] || die "user $name was not created"
    if (($# > 0)); then
        api POST "/users/$id/role-mappings/realm" -H 'Content-Type: application/json' -d "$roles" >/dev/null
    fi
    echo "$id"
}

user_delete() { # name
    local id
    id=$(user_id "$1")
    [[ -n $id ]] || die "no user '$1' in realm $REALM"
    api DELETE "/users/$id" >/dev/null
}

token() { # name password [client]
    http POST "$URL/realms/$REALM/protocol/openid-connect/token" \
        -d grant_type=password --data-urlencode "client_id=${3:-$KEYCLOAK_CLI_CLIENT_ID}" \
        --data-urlencode "username=$1" --data-urlencode "password=$2" | jq -er .access_token
}

# A new rsa-generated component whose priority is above every key of the realm: Keycloak
# signs with the active key of the highest priority, so the next token carries its kid.
key_rotate() {
    local realm_id priority name component kid
    realm_id=$(api GET "" | jq -r .id)
    priority=$(api GET /keys | jq '[.keys[].providerPriority] | max + 1')
    name="rsa-rotated-$(date -u +%Y%m%dT%H%M%S%N)"
    api POST /components -H 'Content-Type: application/json' -d "$(jq -n \
        --arg name "$name" --arg parent "$realm_id" --arg priority "$priority" '{
        name: $name, providerId: "rsa-generated", providerType: "org.keycloak.keys.KeyProvider",
        parentId: $parent,
        config: {priority: [$priority], enabled: ["true"], active: ["true"],
                 algorithm: ["RS256"], keySize: ["2048"]}}')" >/dev/null
    component=$(api GET "/components?type=org.keycloak.keys.KeyProvider&name=$name" | jq -r '.[0].id // empty')
    [[ -n $component ]] || die "component $name was not created"
    kid=$(api GET /keys | jq -r --arg c "$component" '.keys[] | select(.providerId == $c and .use == "SIG") | .kid')
    [[ -n $kid ]] || die "component $component provides no signing key"
    echo "$kid"
}

key_list() {
    api GET /keys | jq -r '.keys | sort_by(-.providerPriority)[] |
        [.kid, .algorithm, .use, (.providerPriority|tostring), .status, .providerId] | @tsv'
}

key_remove() { # kid
    local component
    component=$(api GET /keys | jq -r --arg k "$1" '.keys[] | select(.kid == $k) | .providerId')
    [[ -n $component ]] || die "realm $REALM has no key with kid '$1'"
    api DELETE "/components/$component" >/dev/null
}

case "${1:-} ${2:-}" in
    "user create") shift 2; (($# >= 2)) || usage; user_create "$@" ;;
    "user delete") (($# == 3)) || usage; user_delete "$3" ;;
    "key rotate") (($# == 2)) || usage; key_rotate ;;
    "key list") (($# == 2)) || usage; key_list ;;
    "key remove") (($# == 3)) || usage; key_remove "$3" ;;
    token\ *) (($# >= 3 && $# <= 4)) || usage; shift; token "$@" ;;
    *) usage ;;
esac
