# GET each URL with Net::HTTP (https_proxy; SSL_CERT_FILE for trust); prints status and body.
require 'net/http'

ARGV.each do |url|
  r = Net::HTTP.get_response(URI(url))
  print "#{r.code} #{r.body}"
end
