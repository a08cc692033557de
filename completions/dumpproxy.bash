# bash completion for dumpproxy(1)                          -*- shell-script -*-
#
# Install with `dumpproxy --completions bash > ~/.local/share/bash-completion/completions/dumpproxy`
# (or /usr/share/bash-completion/completions/dumpproxy), or add
# `source <(dumpproxy --completions bash)` to ~/.bashrc. Uses bash-completion's helpers when they are loaded, and works
# without them.

# Every option of dumpproxy, long and short forms (kept in sync with
# dumpproxy/cli.py by tests/test_cli_docs.py).
_dumpproxy_options='
    --listen-host
    -p --listen-port
    --mode
    --ignore-hosts
    --allow-hosts
    --ignore-hosts-file
    --allow-hosts-file
    --egress-allow
    --egress-allow-file
    --egress-deny
    --egress-deny-file
    --egress-audit
    --check
    --pattern-for
    --peek-timeout
    --head-timeout
    --response-timeout
    --connect-timeout
    --idle-timeout
    --pool-idle-timeout
    --shutdown-grace
    --ca-dir
    --print-ca
    -k --ssl-insecure
    --upstream-ca
    --isolate
    --no-browser-flags
    --replay
    --replay-miss
    --replay-ignore-param
    --replay-ignore-body
    --record-for-replay
    --bodies
    --max-body-bytes
    --no-redact
    --proxyauth
    -o --output
    --format
    --schema
    -q --quiet
    -v --verbose
    --completions
    --version
    -h --help
'

_dumpproxy()
{
    local cur prev words cword split=false
    if declare -F _init_completion >/dev/null 2>&1; then
        _init_completion -s -n : || return
    else
        # Without bash-completion: split --opt=value by hand.
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=
        ((cword > 0)) && prev=${COMP_WORDS[COMP_CWORD - 1]}
        if [[ $cur == = && $cword -gt 1 ]]; then
            prev=${COMP_WORDS[COMP_CWORD - 1]}
            cur=
            split=true
        elif [[ $prev == = && $cword -gt 1 ]]; then
            prev=${COMP_WORDS[COMP_CWORD - 2]}
            split=true
        elif [[ $cur == --*=* ]]; then
            prev=${cur%%=*}
            cur=${cur#*=}
            split=true
        fi
    fi

    # `dumpproxy har [FILE...]`, `dumpproxy egress FILE...`, `dumpproxy replay --list FILE...`:
    # event files.
    if ((COMP_CWORD > 1)) && [[ ${COMP_WORDS[1]} == har || ${COMP_WORDS[1]} == egress || ${COMP_WORDS[1]} == replay ]]; then
        if [[ $cur == -* ]]; then
            local subopts='-h --help'
            [[ ${COMP_WORDS[1]} == egress ]] && subopts='--fold-subdomains -h --help'
            [[ ${COMP_WORDS[1]} == replay ]] && subopts='--list -h --help'
            COMPREPLY=($(compgen -W "$subopts" -- "$cur"))
        elif declare -F _filedir >/dev/null 2>&1; then
            _filedir
        else
            compopt -o filenames 2>/dev/null
            COMPREPLY=($(compgen -f -- "$cur"))
        fi
        return
    fi

    # Wrap mode: after "--", complete the command and then its own arguments.
    # (COMP_WORDS, not words: _command_offset counts in COMP_WORDS.)
    local i
    for ((i = 1; i < COMP_CWORD; i++)); do
        if [[ ${COMP_WORDS[i]} == -- ]]; then
            if ((COMP_CWORD == i + 1)); then
                COMPREPLY=($(compgen -c -- "${COMP_WORDS[COMP_CWORD]}"))
            elif declare -F _command_offset >/dev/null 2>&1; then
                _command_offset $((i + 1))
            else
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -f -- "${COMP_WORDS[COMP_CWORD]}"))
            fi
            return
        fi
    done

    case $prev in
        --ignore-hosts-file | --allow-hosts-file | --egress-allow-file | --egress-deny-file | \
            --upstream-ca | -o | --output | --replay)
            if declare -F _filedir >/dev/null 2>&1; then
                _filedir
            else
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -f -- "$cur"))
            fi
            return
            ;;
        --ca-dir)
            if declare -F _filedir >/dev/null 2>&1; then
                _filedir -d
            else
                compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen -d -- "$cur"))
            fi
            return
            ;;
        --mode)
            # MODE@PORT or MODE@HOST:PORT: a listen address follows "@", nothing to offer
            if [[ $cur == *@* ]]; then
                COMPREPLY=()
                return
            fi
            COMPREPLY=($(compgen -W 'regular upstream: reverse: socks5 transparent' -- "$cur"))
            # "upstream:" and "reverse:" are followed by a URL, not a space.
            [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *: ]] && compopt -o nospace 2>/dev/null
            return
            ;;
        --format)
            COMPREPLY=($(compgen -W 'json text' -- "$cur"))
            return
            ;;
        --replay-miss)
            COMPREPLY=($(compgen -W 'refuse forward' -- "$cur"))
            return
            ;;
        --completions)
            COMPREPLY=($(compgen -W 'bash zsh fish' -- "$cur"))
            return
            ;;
        --listen-host)
            if declare -F _known_hosts_real >/dev/null 2>&1; then
                _known_hosts_real -- "$cur"
            else
                COMPREPLY=($(compgen -A hostname -- "$cur"))
            fi
            return
            ;;
        -p | --listen-port | --ignore-hosts | --allow-hosts | --egress-allow | --egress-deny | \
            --check | --pattern-for | \
            --peek-timeout | --head-timeout | --response-timeout | --connect-timeout | \
            --idle-timeout | --pool-idle-timeout | --shutdown-grace | --max-body-bytes | --proxyauth | \
            --replay-ignore-param)
            # A free-form value: nothing sensible to offer.
            return
            ;;
    esac

    $split && return

    if [[ $cur == -* || -z $cur ]]; then
        COMPREPLY=($(compgen -W "$_dumpproxy_options" -- "$cur"))
    fi
    # the subcommand, as the first word
    if ((COMP_CWORD == 1)) && [[ $cur != -* ]]; then
        COMPREPLY+=($(compgen -W 'har egress replay' -- "$cur"))
    fi
} &&
    complete -F _dumpproxy dumpproxy

# ex: filetype=sh
