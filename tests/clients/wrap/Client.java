// GET each URL with java.net.http.HttpClient (the default proxy selector and SSL context:
// the system properties wrap mode gives through JAVA_TOOL_OPTIONS); prints status and body.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

public class Client {
    public static void main(String[] urls) throws Exception {
        HttpClient client = HttpClient.newHttpClient();
        for (String url : urls) {
            HttpResponse<String> r = client.send(HttpRequest.newBuilder(URI.create(url)).build(),
                                                 HttpResponse.BodyHandlers.ofString());
            System.out.print(r.statusCode() + " " + r.body());
        }
    }
}
