<?php
// GET each URL with PHP's https:// stream (file_get_contents); prints status and body.
foreach (array_slice($argv, 1) as $url) {
    $body = file_get_contents($url);
    if ($body === false) {
        exit(1);
    }
    $status = explode(' ', $http_response_header[0])[1];
    echo "$status $body";
}
