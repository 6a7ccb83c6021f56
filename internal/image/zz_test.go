package image
import ("testing";"context";"time")
func TestZZBuild(t *testing.T){
 dd:=seedDataDir(t,false)
 s:=time.Now()
 img,err:=Build(context.Background(), BuildOptions{DataDir:dd, Tiny:true, AgentBinary: standinAgent(t), Progress:&testLogWriter{t:t}})
 t.Logf("%+v %v %s", img, err, time.Since(s))
 s=time.Now()
 img,err=Build(context.Background(), BuildOptions{DataDir:dd, Tiny:true, AgentBinary: standinAgent(t), Progress:&testLogWriter{t:t}})
 t.Logf("%v %s", err, time.Since(s))
 if err==nil { cpTo(t, img.Dir) }
}
func cpTo(t *testing.T, d string){ linkTree(d, "/var/tmp/zzimg") }
