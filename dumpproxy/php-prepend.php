<?php
// dumpproxy wrap mode: PHP's http:// and https:// streams (file_get_contents, fopen, ...)
// read no proxy variable; the default stream context sends them through the proxy that
// HTTPS_PROXY (else HTTP_PROXY) names. Prepended to every script by the ini file that
// wrap mode adds through PHP_INI_SCAN_DIR. PHP's curl extension reads the variables itself.
(function () {
    $url = getenv('HTTPS_PROXY') ?: getenv('https_proxy') ?: getenv('HTTP_PROXY')
        ?: getenv('http_proxy');
    if (!$url) {
        return;
    }
    $proxy = parse_url(strpos($url, '://') === false ? "http://$url" : $url);
    if (!$proxy || !isset($proxy['host']) || ($proxy['scheme'] ?? 'http') !== 'http') {
        return;
    }
    $http = [
        'proxy' => 'tcp://' . $proxy['host'] . ':' . ($proxy['port'] ?? 80),
        'request_fulluri' => true,
    ];
    if (isset($proxy['user'])) {
        $credentials = rawurldecode($proxy['user']) . ':' . rawurldecode($proxy['pass'] ?? '');
        $http['header'] = 'Proxy-Authorization: Basic ' . base64_encode($credentials);
    }
    stream_context_set_default(['http' => $http]);
})();
