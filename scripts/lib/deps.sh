# Shared by scripts/demo and scripts/test (sourced, not executed).
# Installs Debian packages the scripts need, but only when running as root;
# otherwise it explains what to install and fails.

# ensure_pkg COMMAND PACKAGE [SERVICE]
# Makes sure COMMAND is on PATH (memcached lives in /usr/bin, nutcracker in
# /usr/sbin, which a non-login root shell may lack). If it is missing and we
# are root, installs PACKAGE with apt-get. Debian's memcached and nutcracker
# packages start a system service on install (memcached then holds
# 127.0.0.1:11211, the demo's first port), so a service we just caused to
# start is stopped again; a service that was already there is left alone.
ensure_pkg() {
    local cmd=$1 pkg=$2 svc=${3:-}
    case ":$PATH:" in *:/usr/sbin:*) ;; *) PATH="$PATH:/usr/sbin" ;; esac
    command -v "$cmd" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: '$cmd' is not installed and we are not root." >&2
        echo "       install it with: sudo apt-get install -y $pkg" >&2
        return 1
    fi
    echo "==> installing $pkg (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y "$pkg"
    if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "error: installed $pkg but '$cmd' is still not on PATH" >&2
        return 1
    fi
    [ -n "$svc" ] && stop_service_started_by_install "$svc"
    return 0
}

stop_service_started_by_install() {
    local svc=$1
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        if systemctl is-active --quiet "$svc" 2>/dev/null; then
            systemctl stop "$svc"
            echo "==> stopped the $svc service that installing the package started (it would hold our ports)"
        fi
    elif [ -x "/etc/init.d/$svc" ]; then
        if "/etc/init.d/$svc" status >/dev/null 2>&1; then
            "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
            echo "==> stopped the $svc service that installing the package started (it would hold our ports)"
        fi
    fi
}

# ensure_py_module MODULE PACKAGE
# Makes sure `python3 -c "import MODULE"` works: as root, installs Debian's
# PACKAGE; if the python3 on PATH is not Debian's (pyenv, a venv), falls
# back to `python3 -m pip install MODULE`.
ensure_py_module() {
    local mod=$1 pkg=$2
    command -v python3 >/dev/null 2>&1 || ensure_pkg python3 python3 || return 1
    python3 -c "import $mod" 2>/dev/null && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: the python module '$mod' is missing and we are not root." >&2
        echo "       install it with: sudo apt-get install -y $pkg" >&2
        return 1
    fi
    echo "==> installing $pkg (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y "$pkg" || true
    python3 -c "import $mod" 2>/dev/null && return 0
    echo "==> python3 on PATH is not Debian's; pip install $mod"
    python3 -m pip install --quiet "$mod" && python3 -c "import $mod" 2>/dev/null
}
