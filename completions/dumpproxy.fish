# fish completion for dumpproxy(1). Install with
# `dumpproxy --completions fish > ~/.config/fish/completions/dumpproxy.fish`
# (or /usr/share/fish/vendor_completions.d/dumpproxy.fish).

# True once "--" (wrap mode: dumpproxy [OPTIONS] -- CMD [ARG...]) is on the line.
function __fish_dumpproxy_wrapping
    set -l tokens (commandline -opc)
    contains -- -- $tokens[2..-1]
end

# Complete the wrapped command and its arguments, as if typed on their own.
function __fish_dumpproxy_wrapped
    set -l tokens (commandline -opc)
    set -l idx (contains -i -- -- $tokens)
    set -l rest
    if test $idx -lt (count $tokens)
        set rest $tokens[(math $idx + 1)..-1]
    end
    __fish_complete_subcommand --commandline $rest (commandline -ct)
end

# True after "dumpproxy har" (dumpproxy har [FILE...]).
function __fish_dumpproxy_har
    set -l tokens (commandline -opc)
    test (count $tokens) -ge 2; and test "$tokens[2]" = har
end

# True after "dumpproxy egress" (dumpproxy egress FILE...).
function __fish_dumpproxy_egress
    set -l tokens (commandline -opc)
    test (count $tokens) -ge 2; and test "$tokens[2]" = egress
end

# True after "dumpproxy replay" (dumpproxy replay --list FILE...).
function __fish_dumpproxy_replay
    set -l tokens (commandline -opc)
    test (count $tokens) -ge 2; and test "$tokens[2]" = replay
end

complete -c dumpproxy -f
complete -c dumpproxy -n __fish_dumpproxy_wrapping -xa '(__fish_dumpproxy_wrapped)'
complete -c dumpproxy -n 'test (count (commandline -opc)) -eq 1' -a har -d 'Convert event streams to one HAR 1.2 document'
complete -c dumpproxy -n __fish_dumpproxy_har -F
complete -c dumpproxy -n 'test (count (commandline -opc)) -eq 1' -a egress -d 'Propose an egress allow file from captures'
complete -c dumpproxy -n __fish_dumpproxy_egress -F
# egress's own option, offered as a word (the -l options below are the proxy's)
complete -c dumpproxy -n '__fish_dumpproxy_egress; and string match -q -- "-*" (commandline -ct)' -a '--fold-subdomains' -d 'One pattern per registrable domain (Public Suffix List)'

complete -c dumpproxy -n 'test (count (commandline -opc)) -eq 1' -a replay -d 'Show what replay files can serve (replay --list FILE...)'
complete -c dumpproxy -n __fish_dumpproxy_replay -F
complete -c dumpproxy -n __fish_dumpproxy_replay -a --list -d 'List what the files can serve'

set -l opts -n 'not __fish_dumpproxy_wrapping; and not __fish_dumpproxy_har; and not __fish_dumpproxy_egress; and not __fish_dumpproxy_replay'

complete -c dumpproxy $opts -l listen-host -x -a '(__fish_print_hostnames)' -d 'Address to bind (default 127.0.0.1)'
complete -c dumpproxy $opts -s p -l listen-port -x -d 'Port to listen on, 0 for a free one (default 8080)'
complete -c dumpproxy $opts -l mode -x -d 'Proxy mode (default regular; repeatable; MODE@PORT or MODE@HOST:PORT: own listener)' -a '
    regular\t"Explicit HTTP(S) proxy (default)"
    upstream:\t"Through the HTTP proxy at URL"
    reverse:\t"Act as the server at URL"
    socks5\t"SOCKS5 proxy"
    transparent\t"Transparent proxy"'
complete -c dumpproxy $opts -l ignore-hosts -x -d 'Pass matching destinations through (regex, repeatable)'
complete -c dumpproxy $opts -l allow-hosts -x -d 'Intercept only matching destinations (regex, repeatable)'
complete -c dumpproxy $opts -l ignore-hosts-file -r -F -d 'Read ignore patterns from FILE (- for stdin)'
complete -c dumpproxy $opts -l allow-hosts-file -r -F -d 'Read allow patterns from FILE (- for stdin)'
complete -c dumpproxy $opts -l egress-allow -x -d 'Block every destination matching no egress allow pattern (regex, repeatable)'
complete -c dumpproxy $opts -l egress-allow-file -r -F -d 'Read egress allow patterns from FILE (- for stdin)'
complete -c dumpproxy $opts -l egress-deny -x -d 'Block matching destinations (regex, repeatable)'
complete -c dumpproxy $opts -l egress-deny-file -r -F -d 'Read egress deny patterns from FILE (- for stdin)'
complete -c dumpproxy $opts -l egress-audit -d 'Block nothing; decisions that would block say so'
complete -c dumpproxy $opts -l check -x -d 'Print the decision for each HOST:PORT and exit'
complete -c dumpproxy $opts -l pattern-for -x -d 'Print the exact-match pattern for HOST:PORT and exit'
complete -c dumpproxy $opts -l peek-timeout -x -d 'Seconds to wait for a tunnel client\'s first bytes (default 10)'
complete -c dumpproxy $opts -l head-timeout -x -d 'Seconds for a request head or a tunnel\'s first byte (default 60)'
complete -c dumpproxy $opts -l response-timeout -x -d 'Seconds for the response head (default 60)'
complete -c dumpproxy $opts -l connect-timeout -x -d 'Seconds to connect to the destination (default 30)'
complete -c dumpproxy $opts -l idle-timeout -x -d 'Seconds without a byte before a stream is closed (default 600)'
complete -c dumpproxy $opts -l pool-idle-timeout -x -d 'Seconds an idle upstream connection is kept for the next client (default 15)'
complete -c dumpproxy $opts -l shutdown-grace -x -d 'Seconds exchanges in flight may finish on SIGINT/SIGTERM (default 5)'
complete -c dumpproxy $opts -l ca-dir -x -a '(__fish_complete_directories (commandline -ct))' -d 'Directory holding the CA'
complete -c dumpproxy $opts -l print-ca -d 'Print the CA certificate (PEM) and exit'
complete -c dumpproxy $opts -s k -l ssl-insecure -d 'Do not verify upstream certificates'
complete -c dumpproxy $opts -l upstream-ca -r -F -d 'Extra CA bundle trusted for upstream servers'
complete -c dumpproxy $opts -l isolate -d 'Wrap mode: run the command in a network namespace whose only way out is dumpproxy'
complete -c dumpproxy $opts -l no-browser-flags -d 'Wrap mode: add no proxy or CA pin switches to Chromium/Chrome'
complete -c dumpproxy $opts -l replay -r -F -d 'Answer intercepted requests from a capture or HAR file (repeatable)'
complete -c dumpproxy $opts -l replay-miss -x -a 'refuse forward' -d 'A request not in the replay files (default refuse)'
complete -c dumpproxy $opts -l replay-ignore-param -x -d 'Query parameter left out when matching (repeatable)'
complete -c dumpproxy $opts -l replay-ignore-body -d 'Match requests without their bodies'
complete -c dumpproxy $opts -l record-for-replay -d 'Record what replay needs: bodies with no size cap'
complete -c dumpproxy $opts -l bodies -d 'Include bodies in response events'
complete -c dumpproxy $opts -l max-body-bytes -x -d 'Cap on each body kept in an event (default 65536)'
complete -c dumpproxy $opts -l no-redact -d 'Show credential header values'
complete -c dumpproxy $opts -l proxyauth -x -d 'Require proxy authentication, HTTP Basic only for now (USER:PASS)'
complete -c dumpproxy $opts -s o -l output -r -F -d 'Write events to FILE (appending)'
complete -c dumpproxy $opts -l format -x -a 'json text' -d 'Output format (default json)'
complete -c dumpproxy $opts -l schema -d 'Print the JSON Schema of the events and exit'
complete -c dumpproxy $opts -s q -l quiet -d 'Print less on stderr'
complete -c dumpproxy $opts -s v -l verbose -d 'Print more on stderr'
complete -c dumpproxy $opts -l completions -x -a 'bash zsh fish' -d 'Print the completion script for a shell and exit'
complete -c dumpproxy $opts -l version -d 'Print the version and exit'
complete -c dumpproxy $opts -s h -l help -d 'Print a usage summary and exit'
